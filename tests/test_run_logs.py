"""Run logs on disk (tasks/core/runlog.py): logs/pipeline.log, logs/<stage>.log, logs/summary.log.

Unit tests drive RunLogs and the router directly: records from stages running in parallel threads land in
their own stage's file, lines keep reaching the files while llama-cpp-python's own suppress_stdout_stderr
(what `Llama(verbose=False)` uses) has /dev/null over fds 1 and 2, retention removes old runs' parts and
nothing else. Flow tests run the real flow on Prefect's test API: a failing stage (a runner replaced in
flows.stages.RUNNERS) leaves its error and traceback in its log, linked from the summary, the Prefect
summary artifact and the notification; a token value appears in no log file; the real converter's warning
reaches logs/convert.log (and its per-tensor lines do not); the UI still receives every line.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tasks.core.runlog import (
    LoggingSettings,
    RunLogs,
    apply_retention,
    close_run_logs,
    log_dir_for,
    open_run_logs,
    stage_context,
)

TOKEN = "hf_runlogsSecretValue0123456789abcdefXYZ"  # shaped like a Hub token, and registered as a secret
PLAIN_SECRET = "s3cr3t-webhook-key-4711"  # no known shape: only registration scrubs it


def _header(run: str, when: dt.datetime) -> str:
    return f"\n===== loraship run {run} started {when.isoformat(timespec='seconds')} (m v1) =====\n"


# --- retention ---------------------------------------------------------------------------------------------


def test_retention_removes_old_runs_parts_and_nothing_else(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    old, older, recent = now - dt.timedelta(days=40), now - dt.timedelta(days=31), now - dt.timedelta(days=2)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "pipeline.log").write_text(
        _header("run-old", old) + "old line\n" + _header("run-older", older) + "older\n" + _header("run-new", recent)
    )
    (logs / "merge.log").write_text(_header("run-old", old) + "merge of an old run\n")  # only old: file goes
    (logs / "convert.log").write_text("a line before any header (not ours)\n" + _header("run-old", old) + "x\n")
    (logs / "notes.log").write_text("a user's file without our headers\n")
    (logs / "keep.txt").write_text(_header("run-old", old))  # not a .log file
    (logs / "sub").mkdir()
    (logs / "sub" / "pipeline.log").write_text(_header("run-old", old))  # not in the folder itself
    (logs / "undated.log").write_text("\n===== loraship run run-x started yesterday =====\nkept\n")
    current = logs / "serve.log"
    current.write_text(_header("run-now", old) + "the current run is never removed\n")

    removed = apply_retention(logs, days=30, keep_run="run-now")

    assert removed.runs == {"run-old", "run-older"}
    assert removed.files_removed == ["merge.log"]
    assert not (logs / "merge.log").exists()
    assert (logs / "pipeline.log").read_text() == _header("run-new", recent)
    assert (logs / "convert.log").read_text() == "a line before any header (not ours)\n"
    assert (logs / "notes.log").read_text() == "a user's file without our headers\n"
    assert (logs / "keep.txt").read_text() == _header("run-old", old)
    assert (logs / "sub" / "pipeline.log").read_text() == _header("run-old", old)
    assert "kept" in (logs / "undated.log").read_text()
    assert "never removed" in current.read_text()
    assert apply_retention(logs, days=30, keep_run="run-now").runs == set()  # nothing more to do


def test_log_dir_setting(tmp_path: Path) -> None:
    assert log_dir_for(LoggingSettings(), tmp_path, "m", "v1") == tmp_path / "logs"
    custom = LoggingSettings(log_dir=str(tmp_path / "all" / "{model}-{version}"))
    assert log_dir_for(custom, tmp_path / "run", "m", "v2") == tmp_path / "all" / "m-v2"
    from tasks.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"logging.log_dir .*\{model\} and \{version\}"):
        log_dir_for(LoggingSettings(log_dir="/x/{user}"), tmp_path, "m", "v1")
    with pytest.raises(ValueError, match="retention_days"):
        LoggingSettings(retention_days=0)


# --- routing -----------------------------------------------------------------------------------------------


def test_parallel_stages_write_their_own_files_and_fd_1_2_do_not_matter(tmp_path: Path) -> None:
    """Two stages in two threads at once, one while llama-cpp-python has /dev/null over fds 1 and 2."""
    from llama_cpp._utils import suppress_stdout_stderr

    logs = open_run_logs(LoggingSettings(log_dir=str(tmp_path / "logs")), tmp_path, "m", "v1", flow_run_id="unit-1")
    log = logging.getLogger("loraship.test.routing")
    log.setLevel(logging.INFO)
    both = threading.Barrier(2, timeout=30)
    ctx_parent = __import__("contextvars").copy_context()

    def stage(name: str, quiet: bool) -> None:
        with stage_context(name):
            both.wait()
            for i in range(50):
                if quiet and i == 10:
                    with suppress_stdout_stderr(disable=False):  # what Llama(verbose=False) does while loading
                        log.info("%s line %d while fds 1 and 2 are /dev/null", name, i)
                else:
                    log.info("%s line %d", name, i)
                if i % 10 == 0:
                    time.sleep(0.001)
            both.wait()

    threads = [
        threading.Thread(target=ctx_parent.run, args=(stage, "health", True)),
        threading.Thread(target=__import__("contextvars").copy_context().run, args=(stage, "evaluate", False)),
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        log.info("after the stages")
    finally:
        close_run_logs(flow_run_id="unit-1")
    health = (tmp_path / "logs" / "health.log").read_text()
    evaluate = (tmp_path / "logs" / "evaluate.log").read_text()
    pipeline = logs.pipeline_log.read_text()
    assert health.count("health line") == 50 and "evaluate line" not in health
    assert evaluate.count("evaluate line") == 50 and "health line" not in evaluate
    assert "health line 10 while fds 1 and 2 are /dev/null" in health
    assert pipeline.count(" line ") == 100 and "after the stages" in pipeline and "after the stages" not in health
    assert health.startswith("\n===== loraship run unit-1 started ")
    log.info("logs closed: written nowhere")
    assert "written nowhere" not in logs.pipeline_log.read_text()


def test_a_closed_run_keeps_nothing_and_other_runs_stay_apart(tmp_path: Path) -> None:
    """Two flow runs in one process (flows/multi.py runs them in threads): each context writes its own run."""
    import contextvars

    log = logging.getLogger("loraship.test.runs")
    log.setLevel(logging.INFO)
    made: dict[str, RunLogs] = {}

    def one(name: str) -> None:
        made[name] = open_run_logs(LoggingSettings(), tmp_path / name, name, "v1", flow_run_id=f"run-{name}")
        with stage_context("download"):
            log.info("this is %s", name)
        close_run_logs(flow_run_id=f"run-{name}")

    threads = [threading.Thread(target=contextvars.copy_context().run, args=(one, n)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for name, other in (("a", "b"), ("b", "a")):
        text = (tmp_path / name / "logs" / "download.log").read_text()
        assert f"this is {name}" in text and f"this is {other}" not in text


def test_records_from_threads_without_our_context(tmp_path: Path) -> None:
    """A plain threading.Thread (a stage's helper thread) starts with an empty context: with one run open
    its records go to that run's pipeline.log; a record carrying Prefect's flow_run_id goes to that run."""
    log = logging.getLogger("loraship.test.raw")
    log.setLevel(logging.INFO)

    def in_raw_thread(fn: Any) -> None:
        t = threading.Thread(target=fn)
        t.start()
        t.join(30)

    a = open_run_logs(LoggingSettings(), tmp_path / "a", "a", "v1", flow_run_id="raw-a")
    try:
        in_raw_thread(lambda: log.info("from a helper thread"))
        b = open_run_logs(LoggingSettings(), tmp_path / "b", "b", "v1", flow_run_id="raw-b")
        try:
            in_raw_thread(lambda: log.info("whose run is this?"))
            in_raw_thread(lambda: log.info("for b, by flow run id", extra={"flow_run_id": "raw-b"}))
        finally:
            close_run_logs(flow_run_id="raw-b")
    finally:
        close_run_logs(flow_run_id="raw-a")
    assert "from a helper thread" in a.pipeline_log.read_text()
    assert "for b, by flow run id" in b.pipeline_log.read_text()
    assert "for b" not in a.pipeline_log.read_text()
    assert "whose run" not in a.pipeline_log.read_text() + b.pipeline_log.read_text()


def test_a_stages_own_threads_write_its_stage_log_even_with_two_runs_open(tmp_path: Path) -> None:
    """Threads a stage starts itself (tasks/core/threads.py: the quantize types, the converter's side checks, the
    download's hashing) carry the stage's context: their records go to that run's stage log. A plain thread's
    went to pipeline.log with one run open, and to no file with two."""
    from tasks.core.threads import ContextPool, context_thread

    log = logging.getLogger("loraship.test.ctx")
    log.setLevel(logging.INFO)
    a = open_run_logs(LoggingSettings(), tmp_path / "a", "a", "v1", flow_run_id="ctx-a")
    other: list = []  # a second run, opened in another thread (as flows/multi.py runs models side by side)
    opener = threading.Thread(
        target=lambda: other.append(open_run_logs(LoggingSettings(), tmp_path / "b", "b", "v1", flow_run_id="ctx-b"))
    )
    opener.start()
    opener.join(30)
    b = other[0]
    try:
        with stage_context("quantize"):
            with ContextPool(max_workers=2) as pool:
                list(pool.map(lambda i: log.info("type %d quantized", i), range(3)))
            t = context_thread(lambda: log.info("side check done"))
            t.start()
            t.join(30)
    finally:
        close_run_logs(flow_run_id="ctx-b")
        close_run_logs(flow_run_id="ctx-a")
    quantize_log = (a.dir / "quantize.log").read_text()
    for line in ("type 0 quantized", "type 2 quantized", "side check done"):
        assert line in quantize_log
    assert "quantized" not in "".join(f.read_text() for f in b.dir.glob("*.log"))


def test_a_servers_output_in_this_run_goes_to_serve_log(llama_ggufs: dict[str, Path], tmp_path: Path) -> None:
    """The real llama.cpp server writes its own log file (it may outlive the run); what it wrote during the
    run is copied into serve.log when the run's logs close, scrubbed, with a line naming the file."""
    import requests

    from tasks.serve.stage import ServeSettings, serve, stop_servers
    from tests.deploy_helpers import gguf_artifacts

    state = tmp_path / "state"
    state.mkdir()
    (state / "serve-Q4_K_M.log").write_text("an earlier run's server output\n")
    logs = open_run_logs(LoggingSettings(), tmp_path, "m", "v1", flow_run_id="serve-1")
    try:
        with stage_context("serve"):
            with socket.socket() as probe:  # a pool of our own: the default one is shared with other servers here
                probe.bind(("127.0.0.1", 0))
                base = min(probe.getsockname()[1], 60000)
            settings = ServeSettings(n_ctx=128, port_range=(base, base + 20))
            made = serve(gguf_artifacts(llama_ggufs, ("Q4_K_M",)), settings, state)
        try:
            # the server logs at WARNING: a malformed request makes uvicorn print one
            with socket.create_connection(("127.0.0.1", made[0].meta["port"]), timeout=30) as sock:
                sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                sock.recv(1024)
            assert requests.get(f"{made[0].meta['url']}/health", timeout=30).status_code == 200
        finally:
            stop_servers(made)
    finally:
        close_run_logs(flow_run_id="serve-1")
    text = logs.stage_log("serve").read_text()
    model = made[0].meta["model_id"]
    assert f"--- output of the server of {model} ({state / 'serve-Q4_K_M.log'}) in this run ---" in text
    assert "Invalid HTTP request received" in text and "an earlier run's" not in text


# --- the flow ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, prefect_api) -> dict[str, Path]:
    from flows.demo import demo_inputs

    base, adapter = demo_inputs()
    return {"base": base, "adapter": adapter, "runs": tmp_path_factory.mktemp("runs")}


def _config(demo: dict[str, Path], name: str, **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": {"name": name, "version": "v1", "base_model": str(demo["base"])},
        "source": {"kind": "local", "path": str(demo["adapter"])},
        "merge": {"base_model": str(demo["base"])},
        "pipeline": {"runs_dir": str(demo["runs"])},
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


def _all_logs(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.glob("*.log"))}


def _broken_merge(ctx: Any) -> list[Any]:
    from tasks.core.settings import SecretRef

    token = SecretRef.model_validate("env:LORASHIP_RUNLOG_TOKEN").resolve()
    logging.getLogger("loraship.merge").info("merging with token %s", token.get_secret_value())
    print(f"a print with the token {token.get_secret_value()} and the key {PLAIN_SECRET}")
    _deep_failure(token.get_secret_value())
    return []


def _deep_failure(token: str) -> None:
    raise RuntimeError(f"the base refused token {token} (stand-in for a broken merge)")


def test_a_failing_stage_leaves_its_traceback_in_its_log_linked_everywhere(
    demo: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from prefect.artifacts import Artifact
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from flows import stages
    from flows.full import full
    from tasks.core.scrub import register_secret
    from tests.prefect_server import receiver

    monkeypatch.setenv("LORASHIP_RUNLOG_TOKEN", TOKEN)
    register_secret(PLAIN_SECRET)
    monkeypatch.setitem(stages.RUNNERS, "merge", _broken_merge)
    logs = demo["runs"] / "failing" / "v1" / "logs"
    logs.mkdir(parents=True)
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=90)
    (logs / "merge.log").write_text(_header("an-old-run", long_ago) + "yesterday's merge\n")
    with receiver() as rec:
        CustomWebhookNotificationBlock(
            name="runlog-hook", url=rec.url, json_data={"subject": "{{subject}}", "text": "{{body}}"}
        ).save("runlog-hook", overwrite=True)
        cfg = _config(
            demo,
            "failing",
            logging={"retention_days": 30},
            notifications={"on_failure": ["custom-webhook/runlog-hook"]},
        )
        state = full(config=cfg, only=["download", "merge"], return_state=True)
        assert state.is_failed()
        got = rec.wait_for(1)
    files = _all_logs(logs)
    assert set(files) >= {"pipeline.log", "download.log", "merge.log", "summary.log"}
    merge = files["merge.log"]
    assert "yesterday's merge" not in merge  # retention: 90 days old, limit 30
    flow_run_id = str(state.state_details.flow_run_id)
    assert f"===== loraship run {flow_run_id} started " in merge
    assert "Traceback (most recent call last)" in merge and "in _deep_failure" in merge
    assert "RuntimeError: the base refused token" in merge and "merging with token" in merge
    assert "merging with token" not in files["download.log"]
    assert "a print with the token" in files["pipeline.log"]  # log_prints: the flow's print goes in too
    assert "flow run ended Failed" in files["pipeline.log"].split("=====")[-1]
    for name, text in files.items():
        assert TOKEN not in text and PLAIN_SECRET not in text, f"a secret in {name}"
    # the run summary: the stage table, the failed stage's log, the retention count
    summary_log = files["summary.log"]
    assert f"log of merge: {logs / 'merge.log'}" in summary_log
    assert "merge" in summary_log and "failed" in summary_log
    assert "retention removed the logs of 1 older run(s)" in summary_log
    # the notification and the Prefect summary artifact link it too
    assert f"log of merge: {logs / 'merge.log'}" in got[0]["json"]["text"]
    artifact = Artifact.get("summary-failing")
    assert artifact is not None and f"**log of merge**: {logs / 'merge.log'}" in str(artifact.data)


def test_a_degraded_run_links_the_failed_stages_log(demo: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """pipeline.continue_on_error: a non-critical stage fails, the run completes degraded, and its summary
    (returned, summary.log, the markdown artifact) links the stage's log with the traceback in it."""
    from prefect.artifacts import Artifact

    from flows import stages
    from flows.full import full

    def broken(ctx: Any) -> list[Any]:
        raise ValueError("no eval samples (stand-in for a broken evaluation)")

    monkeypatch.setitem(stages.RUNNERS, "evaluate", broken)
    state = full(
        config=_config(demo, "degraded", pipeline={"continue_on_error": True}), only=["evaluate"], return_state=True
    )
    assert state.is_completed(), state.message
    summary = state.result()
    log = Path(summary.log_dir) / "evaluate.log"
    assert summary.degraded and summary.links["log of evaluate"] == str(log)
    assert "ValueError: no eval samples" in log.read_text() and "Traceback" in log.read_text()
    assert f"log of evaluate: {log}" in (log.parent / "summary.log").read_text()
    artifact = Artifact.get("summary-degraded")
    assert artifact is not None and str(log) in str(artifact.data)


def test_the_command_line_points_at_the_logs_of_a_failed_run(demo: dict[str, Path], tmp_path: Path) -> None:
    """`python -m flows.full` with a base model that is not there: merge fails at once (a PermanentError),
    the command says where the run logs are, and merge.log has the reason."""
    import subprocess
    import sys

    import yaml

    cfg = _config(demo, "cli-fail")
    cfg["merge"]["base_model"] = str(tmp_path / "no-such-base")
    cfg["pipeline"]["stages"] = ["download", "merge"]
    path = tmp_path / "deployment_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.full", "--config", str(path)],
        cwd=Path(__file__).resolve().parents[1],
        env={**env, "PREFECT_HOME": str(tmp_path / "prefect-home")},
        capture_output=True,
        text=True,
        timeout=400,
    )
    logs = demo["runs"] / "cli-fail" / "v1" / "logs"
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert f"run logs: {logs} (summary.log links the failed stage's log)" in proc.stderr, proc.stderr[-3000:]
    merge = (logs / "merge.log").read_text()
    assert "stage merge failed" in merge and "no-such-base" in merge
    assert f"log of merge: {logs / 'merge.log'}" in (logs / "summary.log").read_text()


def test_parallel_stages_in_the_flow_and_the_ui_gets_every_line(
    demo: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve and evaluate run at the same time (both wait only for quantize, carried here); each logs from its
    own thread and evaluate also from a mapped child task in the flow's task runner."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows import stages
    from flows.full import full

    both = threading.Barrier(2, timeout=60)
    log = logging.getLogger("loraship.test.flow")

    @task(cache_policy=NO_CACHE, persist_result=False)
    def item(i: int) -> int:
        logging.getLogger("loraship.test.item").info("evaluate item %d from a task runner thread", i)
        return i

    def stand_in(name: str):
        def runner(ctx: Any) -> list[Any]:
            both.wait()
            for i in range(20):
                log.info("%s line %d", name, i)
            if name == "evaluate":
                ctx.map("evaluate", item, [1, 2])
            both.wait()
            return []

        return runner

    monkeypatch.setitem(stages.RUNNERS, "serve", stand_in("serve"))
    monkeypatch.setitem(stages.RUNNERS, "evaluate", stand_in("evaluate"))
    state = full(config=_config(demo, "parallel"), only=["serve", "evaluate"], return_state=True)
    assert state.is_completed(), state.message
    logs = demo["runs"] / "parallel" / "v1" / "logs"
    files = _all_logs(logs)
    assert files["serve.log"].count("serve line") == 20 and "evaluate" not in files["serve.log"].split("=====")[-1]
    assert files["evaluate.log"].count("evaluate line") == 20 and "serve line" not in files["evaluate.log"]
    assert files["evaluate.log"].count("from a task runner thread") == 2
    # Prefect's own lines name their task run, as on its console
    assert len(re.findall(r"task run 'item-\w+' \| Finished in state Completed", files["evaluate.log"])) == 2
    assert "serve: done" in files["pipeline.log"] and "evaluate: done" in files["pipeline.log"]
    assert files["pipeline.log"].rstrip().endswith("flow run ended Completed")
    summary = state.result()
    assert summary.log_dir == str(logs) and "logs: " + str(logs) in files["summary.log"]
    APILogHandler().flush()  # the batch of lines still queued for the API
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 30
        while True:
            lines = [
                r.message
                for r in client.read_logs(
                    log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
                )
            ]
            if sum("line" in m for m in lines) >= 40 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert sum(m.startswith("serve line") for m in lines) == 20
    assert sum(m.startswith("evaluate line") for m in lines) == 20


def _dask_item(i: int) -> int:
    logging.getLogger("loraship.test.dask").info("quantize item %d on a Dask thread", i)
    return i


def test_a_fan_out_on_dask_threads_lands_in_its_stage_log(demo: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    """performance.task_runner: dask (a local cluster of threads): the fan-out's records still land in the
    stage's log, and in that stage's only."""
    pytest.importorskip("prefect_dask", reason="prefect-dask is not installed (./setup.sh --test installs it)")
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    from flows import stages
    from flows.config import parse_config
    from flows.full import full
    from flows.task_runners import configured_flow

    item = task(name="quantize", cache_policy=NO_CACHE, persist_result=False)(_dask_item)

    def fan_out(ctx: Any) -> list[Any]:
        ctx.map("quantize", item, [1, 2, 3])
        return []

    monkeypatch.setitem(stages.RUNNERS, "quantize", fan_out)
    cfg = _config(demo, "dask-threads", performance={"task_runner": "dask", "parallelism": 2})
    state = configured_flow(full, parse_config(cfg))(config=cfg, only=["quantize"], return_state=True)
    assert state.is_completed(), state.message
    files = _all_logs(demo["runs"] / "dask-threads" / "v1" / "logs")
    assert files["quantize.log"].count("on a Dask thread") == 3 and files["pipeline.log"].count("on a Dask thread") == 3
    assert "DaskTaskRunner" in files["summary.log"]


def _worker_item(i: int) -> int:
    logging.getLogger("loraship.test.dask").info("quantize item %d in worker process %d", i, os.getpid())
    return i


def test_dask_worker_processes_write_the_stage_log(
    demo: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """performance.dask_processes: the quantize items run in other processes, which append to the same
    files (found by Prefect's run context there), under the run's one header. Needs a real Prefect server."""
    pytest.importorskip("prefect_dask", reason="prefect-dask is not installed (./setup.sh --test installs it)")
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    from flows import stages
    from flows.config import parse_config
    from flows.full import full
    from flows.task_runners import configured_flow
    from tests.prefect_server import serving

    item = task(name="quantize", cache_policy=NO_CACHE, persist_result=False)(_worker_item)

    def fan_out(ctx: Any) -> list[Any]:
        logging.getLogger("loraship.test.dask").info("quantize fan-out from the flow's process %d", os.getpid())
        ctx.map("quantize", item, [1, 2, 3, 4])
        return []

    monkeypatch.setitem(stages.RUNNERS, "quantize", fan_out)
    perf = {"task_runner": "dask", "dask_processes": True, "parallelism": 2}
    cfg = _config(demo, "dask-procs", performance=perf, logging={"level": "INFO"})
    with serving(tmp_path / "prefect-server"):
        state = configured_flow(full, parse_config(cfg))(config=cfg, only=["quantize"], return_state=True)
    assert state.is_completed(), state.message
    text = (demo["runs"] / "dask-procs" / "v1" / "logs" / "quantize.log").read_text()
    pids = {int(p) for p in re.findall(r"in worker process (\d+)", text)}
    assert len(re.findall(r"quantize item \d in worker process", text)) == 4
    assert pids and os.getpid() not in pids and f"from the flow's process {os.getpid()}" in text
    assert text.count(f"===== loraship run {state.state_details.flow_run_id} started") == 1


def test_the_converter_warning_reaches_convert_log(
    demo: dict[str, Path], qwen2_base: Path, qwen2_adapter: Path
) -> None:
    """Qwen2's home-trained BPE tokenizer has a pre-tokenizer hash llama.cpp does not know: with vocab_pre
    the converter warns and goes on. The warning (a subprocess's output) is in convert.log, the converter's
    and llama.cpp quantize's per-tensor lines are not (as on the terminal), nothing of convert is in merge.log."""
    from flows.full import full

    cfg = _config(demo, "convert-warn", convert={"vocab_pre": "qwen2"}, quantization={"types": ["Q8_0"]})
    cfg["model"]["base_model"] = str(qwen2_base)
    cfg["merge"]["base_model"] = str(qwen2_base)
    cfg["source"]["path"] = str(qwen2_adapter)
    state = full(config=cfg, only=["download", "merge", "convert", "quantize"], return_state=True)
    assert state.is_completed(), state.message
    files = _all_logs(demo["runs"] / "convert-warn" / "v1" / "logs")
    convert = files["convert.log"]
    assert "converter: WARNING" in convert and "unknown BPE pre-tokenizer hash" in convert
    assert "blk.0.attn_q.weight" not in convert  # per-tensor lines stay out
    assert "converter:" not in files["merge.log"]
    # llama.cpp's quantize prints a line per tensor through llama-cpp-python's logger: kept out too
    quantize = files["quantize.log"]
    assert "convert-warn-Q8_0.gguf:" in quantize and "bits/weight" in quantize
    assert "blk.0" not in quantize and "type =" not in quantize
