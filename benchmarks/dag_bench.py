"""Issue 13: the pipeline's wall time before and after it became a DAG, side by side.

    python -m benchmarks.dag_bench                  # demo + 0.5B model, one round (about 15 minutes on 2 cores)
    python -m benchmarks.dag_bench --only demo --repeat 3

Contenders, each a fresh `python -m flows.full --config ...` child process on a fresh run folder, every
stage (the Hub push goes to the local Hub-compatible server of tests/hub_server.py over loopback, with a
write token, so the upload is real work; LM Studio is a temporary home folder):

- `before`: the code of `--before REV` (default: the last commit before the stage table), extracted with
  `git archive` into a temporary folder and run from there: stages one after another in the old order
  (hub push, card, space before serve, health, evaluate: the pushed card has no eval numbers);
- `after, one stage at a time`: this code with `pipeline.max_parallel_stages: 1` (the same graph walked in
  table order, one stage at a time);
- `after, DAG`: this code as shipped (independent stages at the same time).

The `after` contenders run the stages the `before` code has (every stage but the chat-template contract,
which came later), so the three do the same work.

Each contender runs twice on its run folder: the first run, then the same config again (the re-run,
where the content cache answers and the publishing stages compare with the Hub). Rounds alternate the
contenders' order. The models (demo; a random 0.48B bf16 Llama-style model with an r=16 adapter) are
built once and cached, so no contender pays for them. Results: a table on stdout and
benchmarks/results/dag.json. On a shared 2-core machine the ratios are the meaningful part.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks.harness import ROOT, machine, measure, python, save, table
from flows.stages import STAGES

BEFORE_REV = "b9e1e7a"  # main before the stage table landed (the flow walked STAGES in a line)
TOKEN_ENV = "LORASHIP_BENCH_HUB_TOKEN"
RUNS = ("first run", "re-run")  # a fresh run folder, then the same config again (cached stages)


def extract(rev: str, dest: Path, repo: Path = ROOT) -> Path:
    """The project's files at `rev`, in `dest` (no checkout: `git archive`)."""
    archive = dest.with_suffix(".tar")
    subprocess.run(["git", "-C", str(repo), "archive", "-o", str(archive), rev], check=True)
    dest.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()
    return dest


def workload(name: str) -> tuple[Path, Path, dict[str, Any]]:
    """(base, adapter, extra config) of a workload."""
    if name == "demo":
        from flows.demo import demo_inputs

        base, adapter = demo_inputs()
        extra = {
            "serving": {"n_ctx": 256},
            "health_check": {"test_prompts": ["What color is the cat?", "Spell gguf."], "max_tokens": 12},
            "evaluation": {"max_tokens": 12, "n_ctx": 256},
        }
        return base, adapter, extra
    from benchmarks.pipeline_bench import bench_inputs

    base, adapter = bench_inputs()
    return base, adapter, {"serving": {"n_ctx": 512}, "evaluation": {"max_tokens": 16, "n_ctx": 512}}


def write_config(
    path: Path,
    name: str,
    base: Path,
    adapter: Path,
    extra: dict[str, Any],
    hub_url: str,
    parallel: int | None,
    tree: Path = ROOT,
    before_tree: Path | None = None,
) -> Path:
    runs = path.parent / "runs"
    cfg: dict[str, Any] = {
        "model": {"name": name, "version": "v1", "base_model": str(base)},
        "source": {"kind": "local", "path": str(adapter)},
        "merge": {"base_model": str(base)},
        "hub": {"token": f"env:{TOKEN_ENV}", "endpoint": hub_url},
        "space": {"poll_interval": 0.1},
        "deployment": {"lmstudio_home": str(path.parent / "lmstudio"), "ollama_enabled": False},
        "pipeline": {"runs_dir": str(runs)},
        **extra,
    }
    # ports of its own: the default pool (8100-8200) is shared with every test run on the machine, and a
    # server another process binds between the free-port probe and the bind answers the health check
    cfg.setdefault("serving", {})["port_range"] = [18100, 18199]
    if tree != before_tree:  # keys the `before` code does not know
        if parallel is not None:
            cfg["pipeline"]["max_parallel_stages"] = parallel
        # the same stages as the `before` code: the chat-template contract came later (and refuses the 0.5B
        # model's home-made tokenizer, which llama.cpp tokenizes differently: a finding, not DAG work)
        cfg["pipeline"]["stages"] = [str(s) for s in STAGES if s != "template_contract"]
        cfg["space"]["smoke_test"] = False  # no Space app runs behind the local Hub server (as in tests/test_dag.py)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=BEFORE_REV, help="git revision of the `before` contender")
    ap.add_argument("--repo", type=Path, default=ROOT, help="the git repository holding --before")
    ap.add_argument("--only", choices=["demo", "0.5b"], nargs="+", default=["demo", "0.5b"])
    ap.add_argument("--repeat", type=int, default=1, help="rounds (contender order alternates)")
    ap.add_argument("--name", default="dag", help="results file: benchmarks/results/<name>.json")
    args = ap.parse_args()

    from tests.hub_server import HubServer

    work = Path(tempfile.mkdtemp(prefix="loraship-dag-bench-"))
    old = extract(args.before, work / "before-tree", args.repo)
    hub = HubServer(work / "hub").start()
    hub.state.add_token("hf_write_bench", "bench", "write")
    env = {TOKEN_ENV: "hf_write_bench", "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    result: dict[str, Any] = {"machine": machine(), "before_rev": args.before, "rows": []}
    contenders = [
        ("before (one after another, old order)", old, None),
        ("after, one stage at a time", ROOT, 1),
        ("after, DAG", ROOT, None),
    ]
    try:
        for wl in args.only:
            base, adapter, extra = workload(wl)
            walls: dict[tuple[str, str], list[float]] = {(c[0], a): [] for c in contenders for a in RUNS}
            for rnd in range(args.repeat):
                order = contenders if rnd % 2 == 0 else contenders[::-1]
                for label, tree, parallel in order:
                    slug = f"{wl}-{rnd}-{label.split()[0].strip(',')}-{parallel or 'all'}"
                    name = "bench" + "".join(c for c in slug if c.isalnum())[:40]
                    cfg = write_config(
                        work / slug / "config.yaml", name, base, adapter, extra, hub.url, parallel, tree, old
                    )
                    for attempt in ("first run", "re-run"):
                        load = round(os.getloadavg()[0], 2)
                        r = measure(
                            [python(), "-m", "flows.full", "--config", str(cfg), "--json"],
                            env={**env, "PYTHONPATH": str(tree)},
                            cwd=tree,
                        )
                        if r["returncode"]:
                            print(f"!! {label} failed:\n{r['tail']}")
                        repo = hub.state.repos.get(("model", f"bench/{name}-GGUF"))
                        walls[(label, attempt)].append(r["wall_s"])
                        result["rows"].append(
                            {
                                "workload": wl,
                                "round": rnd,
                                "contender": label,
                                "run": attempt,
                                "wall_s": r["wall_s"],
                                "cpu_s": r["cpu_s"],
                                "peak_rss_mb": r["peak_rss_mb"],
                                "hub_commits": len(repo.commits) - 1 if repo else None,
                                "load_1m_before": load,
                                "returncode": r["returncode"],
                            }
                        )
                        print(result["rows"][-1], flush=True)
                        save(args.name, result)  # after every run: a bench cut short keeps what it measured
                    shutil.rmtree(work / slug / "runs", ignore_errors=True)
            for attempt in RUNS:
                base_wall = statistics.median(walls[(contenders[0][0], attempt)])
                for label, _, _ in contenders:
                    med = statistics.median(walls[(label, attempt)])
                    result.setdefault("summary", []).append(
                        {
                            "workload": wl,
                            "run": attempt,
                            "contender": label,
                            "median_wall_s": med,
                            "vs_before": round(med / base_wall, 3),
                        }
                    )
    finally:
        hub.stop()
        shutil.rmtree(work, ignore_errors=True)
    out = save(args.name, result)
    cols = ["workload", "round", "contender", "run", "wall_s", "cpu_s", "peak_rss_mb", "hub_commits", "load_1m_before"]
    print(table(result["rows"], cols))
    print(table(result["summary"], ["workload", "run", "contender", "median_wall_s", "vs_before"]))
    print(f"written: {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
