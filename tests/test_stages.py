"""The stage table (flows/stages.py): every row is complete and consistent, everything derived from it agrees,
and the README's drawing of the graph is the table's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from flows import stages
from flows.config import SECTION_OWNERS, PipelineConfig, parse_config
from flows.stages import TABLE, StageSpec, check_table
from tasks.core.vocab import ArtifactKind, Stage, StageStatus

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("spec", TABLE, ids=lambda s: str(s.name))
def test_every_stage_row_is_complete(spec: StageSpec) -> None:
    assert isinstance(spec.name, Stage)
    if spec.section is None:  # settings in a pipeline-wide section (the gate: pipeline.gate, pipeline.approval)
        assert spec.settings is None and "pipeline." in spec.summary
    else:
        # its section is in the config, typed with its Settings model, owned by the module that defines it
        field = PipelineConfig.model_fields[spec.section]
        assert field.annotation is spec.settings
        assert SECTION_OWNERS[spec.section] == spec.owner and (ROOT / spec.owner).is_file()
        # every setting says what it does (the config reference and --validate show it)
        for name, f in spec.settings.model_fields.items():
            assert f.description, f"{spec.section}.{name} has no description"
    assert callable(spec.runner) and spec.runner is stages.RUNNERS[spec.name]
    assert spec.summary and all(isinstance(k, ArtifactKind) for k in (*spec.takes, *spec.makes))
    assert spec.makes, f"{spec.name} makes nothing"


def test_derived_sets_come_from_the_table() -> None:
    assert stages.STAGES == tuple(s.name for s in TABLE)
    assert set(stages.STAGES) == set(Stage)  # every Stage member has a row
    assert stages.CRITICAL_STAGES == {Stage.DOWNLOAD, Stage.MERGE, Stage.CONVERT, Stage.QUANTIZE}
    assert stages.HEAVY_STAGES == {Stage.MERGE, Stage.QUANTIZE}
    cfg = parse_config({"model": {"name": "m"}, "source": {"path": "/p"}})
    assert cfg.pipeline.stages == list(stages.STAGES)
    assert [s.name for s in TABLE if s.implied] == [Stage.GATE]


def test_evaluation_comes_before_publishing() -> None:
    assert stages.STAGES.index(Stage.EVALUATE) < stages.STAGES.index(Stage.HUB_PUSH)
    assert Stage.EVALUATE in stages.ancestors(Stage.HUB_PUSH)
    assert Stage.HUB_PUSH in stages.descendants(Stage.QUANTIZE)
    for publishing in (Stage.HUB_PUSH, Stage.CARD, Stage.SPACE, Stage.LOCAL_DEPLOY):
        assert Stage.GATE in stages.ancestors(publishing, hard=True)


def test_the_gate_waits_for_what_it_checks() -> None:
    base = {"model": {"name": "m"}, "source": {"path": "/p"}}
    gate = stages.SPECS[Stage.GATE]
    assert gate.upstream_for(parse_config(base)) == (Stage.QUANTIZE,)  # off: publishing does not wait for health
    on = parse_config({**base, "pipeline": {"gate": {"max_kl_div": 0.1}}})
    assert set(gate.upstream_for(on)) == {Stage.QUANTIZE, Stage.HEALTH, Stage.EVALUATE}
    health_only = parse_config({**base, "pipeline": {"gate": {}}})
    assert set(gate.upstream_for(health_only)) == {Stage.QUANTIZE, Stage.HEALTH}
    assert Stage.EVALUATE in stages.ancestors(Stage.HUB_PUSH, config=parse_config(base))  # the card's numbers


def test_a_broken_table_is_refused() -> None:
    by = {s.name: s for s in TABLE}
    late = TABLE[:1] + (dataclasses.replace(by[Stage.MERGE], needs=(Stage.CONVERT,)),) + TABLE[2:]
    with pytest.raises(ValueError, match="not an earlier row"):
        check_table(late)
    orphan = (dataclasses.replace(by[Stage.DOWNLOAD], takes=(ArtifactKind.GGUF,)),) + TABLE[1:]
    with pytest.raises(ValueError, match="takes 'gguf'"):
        check_table(orphan)
    twice = TABLE + (dataclasses.replace(by[Stage.CARD], name=Stage.CARD),)
    with pytest.raises(ValueError, match="twice"):
        check_table(twice)


def test_statuses_read_as_json_text() -> None:
    assert StageStatus.DRY_RUN == "dry-run" and f"{StageStatus.SUPERSEDED}" == "superseded"
    assert {s.value for s in StageStatus if s.ok} == {"done", "cached", "dry-run"}


def test_readme_draws_the_table() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "```mermaid\n" + stages.mermaid() + "\n```" in readme, "README stage graph: paste flows.stages.mermaid()"
    assert stages.stage_table_markdown() in readme, "README stage table: paste flows.stages.stage_table_markdown()"


def test_readme_config_reference_names_the_owners() -> None:
    import re

    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([\w/.]+\.py) \|", readme, flags=re.M))
    assert rows == SECTION_OWNERS


def test_stage_modules_import_without_prefect_and_make_their_task_on_first_use() -> None:
    """Importing a stage module makes no Prefect task (stage_task's LazyTask): a process that only calls a stage's
    plain function (the fused converter, the benchmarks' children) does not import Prefect, ~2 s. Before, every
    stage module imported Prefect at import time. The task, once asked for, is Prefect's own."""
    import subprocess
    import sys

    code = """
import importlib, sys
from pathlib import Path
files = [f for f in Path("tasks").rglob("*.py") if "@stage_task(" in f.read_text()]  # every module making a stage task
lazy = []
for f in files:
    mod = importlib.import_module(".".join(f.with_suffix("").parts))
    lazy += [obj for obj in vars(mod).values() if type(obj).__name__ == "LazyTask"]
print(len(lazy), "prefect" in sys.modules)
from tasks.merge.stage import merge_task
from prefect import Task
assert isinstance(merge_task.task, Task) and isinstance(merge_task.with_options(name="x"), Task)
assert merge_task.name == "merge"
print("made", "prefect" in sys.modules)
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = out.stdout.split("\n")[-3:-1]
    count, loaded = first.split()
    assert int(count) >= 15 and loaded == "False", first
    assert second == "made True"
