"""The template_contract stage inside the real flow (a real Prefect test API): PASS recorded and cached, a FAIL
fails the run, degrades it under continue_on_error, and the model card's usage section says what was found.

Earlier stages' artifacts (the merged model, the GGUFs) are recorded in the run folder's manifest from the
fixtures, as a run that made them would have; local_deploy, template_contract and card really run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks.core.artifacts import Artifact
from tasks.core.run import RunFolder
from tests.deploy_helpers import gguf_artifacts

pytestmark = [pytest.mark.prefect, pytest.mark.slow]
STAGES = ["local_deploy", "template_contract", "card"]


def _run(tmp_path: Path, base: Path, ggufs: dict[str, Path], **pipeline) -> tuple[dict, RunFolder]:
    cfg = {
        "model": {"name": "chat", "version": "v1", "base_model": str(base)},
        "source": {"kind": "local", "path": str(tmp_path / "adapter")},
        "deployment": {"lmstudio_home": str(tmp_path / "lmstudio")},
        "template_contract": {"natural_stop": "warn"},
        "pipeline": {"runs_dir": str(tmp_path / "runs"), **pipeline},
    }
    run = RunFolder.for_model(tmp_path / "runs", "chat", "v1").ensure()
    merged_dir = run.merged_dir
    shutil.copytree(base, merged_dir)
    run.record("merge", "done", [Artifact.from_path(merged_dir, name="merged", kind="merged", stage="merge")])
    copies = {}
    for q, src in ggufs.items():
        copies[q] = run.gguf_dir / f"chat-{q}.gguf"
        copies[q].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, copies[q])
    run.record("quantize", "done", gguf_artifacts(copies))
    return cfg, run


def test_a_passing_contract_is_recorded_cached_and_in_the_card(prefect_api, tmp_path, qwen2_base, qwen2_ggufs):
    from flows.full import full

    cfg, run = _run(tmp_path, qwen2_base, qwen2_ggufs)
    first = full(config=cfg, only=STAGES)
    by = {s.stage: s for s in first.stages}
    assert by["template_contract"].status == "done", by["template_contract"].message
    assert (
        by["template_contract"].message.startswith(("PASS", "WARN"))
        and "same tokens" in by["template_contract"].message
    )
    assert first.links["template contract"].endswith("template-contract.md")
    report = run.load_manifest().artifacts["report:template-contract"]
    assert report.kind == "report" and report.meta["family"] == "chatml"
    assert (run.reports_dir / "template-contract.json").is_file()
    card = (run.reports_dir / "README.md").read_text()
    assert "### Chat format" in card and "ends with `<|im_end|>`" in card
    second = full(config=cfg, only=["local_deploy", "template_contract"])
    assert {s.stage: s.status for s in second.stages}["template_contract"] == "cached"


def test_a_failing_contract_fails_the_run_or_degrades_it(prefect_api, tmp_path, llama_base, llama_ggufs):
    from flows.full import full

    cfg, run = _run(tmp_path, llama_base, llama_ggufs)
    with pytest.raises(Exception, match="chat-template contract failed: .*differs from transformers at token"):
        full(config=cfg, only=STAGES)
    assert run.load_manifest().stages["template_contract"].status == "failed"

    cfg["pipeline"]["continue_on_error"] = True
    summary = full(config=cfg, only=STAGES)
    by = {s.stage: s for s in summary.stages}
    assert summary.degraded and by["template_contract"].status == "degraded"
    assert "template-contract.md" in by["template_contract"].message
    assert by["card"].status == "done" and by["template_contract"].artifacts == ["report:template-contract"]
    assert run.load_manifest().artifacts["report:template-contract"].meta["verdict"] == "fail"  # recorded anyway
    card = (run.reports_dir / "README.md").read_text()
    assert "template contract found a difference" in card and "FROM hf.co/" not in card  # no unchecked Modelfile
