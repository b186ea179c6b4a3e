"""The converter's lean imports (tasks/gguf/lean_imports.py): less imported, the same GGUF, a cache that follows
the files it stands for. The converter is llama.cpp's real one (runtime commit), run as the convert stage runs it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from tasks.gguf import lean_imports
from tasks.gguf.convert import entry_command
from tasks.gguf.toolchain import resolve_converter

GGUF_DIR = Path(lean_imports.__file__).parent

#: What the converter imports of transformers (conversion/base.py, load_hparams, the vocab), in a fresh process.
PROBE = """
import json, sys, time
sys.path.insert(0, {gguf_dir!r})
import lean_imports
if {lean!r}:
    lean_imports.install(__import__("pathlib").Path({cache!r}))
from transformers import AutoConfig, AutoTokenizer
AutoConfig.for_model("llama").to_dict()
import transformers.utils.import_utils as iu
print(json.dumps({{"distributed": "torch.distributed.tensor" in sys.modules,
                  "kept": iu.define_import_structure.__module__ == "lean_imports"}}))
"""


def _probe(cache: Path, lean: bool) -> dict[str, bool]:
    code = PROBE.format(gguf_dir=str(GGUF_DIR), cache=str(cache), lean=lean)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_the_converter_process_skips_transformers_tensor_parallel_import_and_keeps_the_scan(tmp_path):
    """Fails if transformers renames what is swapped (the converter would only be slower: this says so)."""
    plain = _probe(tmp_path / "plain", lean=False)
    assert plain == {"distributed": True, "kept": False}  # what transformers does by itself
    assert _probe(tmp_path / "cache", lean=True) == {"distributed": False, "kept": True}
    kept = sorted(p.name for p in (tmp_path / "cache").glob("import-structure-*.json"))
    assert kept, "the import structure was not kept"
    assert _probe(tmp_path / "cache", lean=True) == {"distributed": False, "kept": True}
    assert sorted(p.name for p in (tmp_path / "cache").glob("import-structure-*.json")) == kept  # read, not rescanned


def test_the_kept_structure_equals_transformers_scan():
    import transformers
    from transformers.utils.import_utils import define_import_structure

    models = Path(transformers.__file__).parent / "models"
    structure = define_import_structure(models, prefix="models")
    assert lean_imports.decode(json.loads(json.dumps(lean_imports.encode(structure)))) == structure


def test_the_cache_is_rescanned_when_a_scanned_file_or_the_version_changes(tmp_path):
    tree = tmp_path / "models"
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "configuration_a.py").write_text("__all__ = ['AConfig']\n")
    calls: list[str] = []

    def scan(module_path, prefix=None):  # noqa: ANN001 - transformers' signature
        calls.append(str(module_path))
        return {frozenset(): {f"{prefix}.a.configuration_a": {"AConfig", f"n{len(calls)}"}}}

    def fresh(version: str = "5.0"):  # a new process: a new in-memory cache over the same folder
        return lean_imports._kept(scan, tmp_path / "cache", version)

    first = fresh()(tree, "models")
    assert fresh()(tree, "models") == first and len(calls) == 1  # kept on disk
    (tree / "a" / "configuration_a.py").write_text("__all__ = ['AConfig', 'BConfig']\n")
    assert fresh()(tree, "models") != first and len(calls) == 2  # a changed file: scanned again
    fresh()(tree, "models")
    assert len(calls) == 2
    fresh("5.1")(tree, "models")
    assert len(calls) == 3  # another transformers version
    for f in (tmp_path / "cache").glob("*.json"):
        f.write_text("{not json")
    fresh("5.1")(tree, "models")
    assert len(calls) == 4  # an unreadable cache is a miss, never an error
    assert not list((tmp_path / "cache").glob(".import-structure-*")), "a temporary file was left behind"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lean_converter_writes_the_same_gguf_as_upstream_run_directly(llama_base, tmp_path):
    conv = resolve_converter()
    args = [str(llama_base), "--outtype", "f16", "--outfile"]
    upstream = tmp_path / "upstream.gguf"
    subprocess.run(
        [sys.executable, str(conv.root / "convert_hf_to_gguf.py"), *args, str(upstream)],
        env=conv.env(),
        check=True,
        capture_output=True,
    )
    ours = tmp_path / "ours.gguf"
    subprocess.run(
        [*entry_command(conv), "--", *args, str(ours)],
        env={**conv.env(), lean_imports.ENV: "1"},
        check=True,
        capture_output=True,
    )
    assert _sha(ours) == _sha(upstream)


def test_lean_imports_can_be_turned_off(monkeypatch):
    for value, on in (("0", False), ("off", False), ("1", True), ("", True)):
        monkeypatch.setenv(lean_imports.ENV, value)
        assert lean_imports.enabled() is on
    monkeypatch.delenv(lean_imports.ENV)
    assert lean_imports.enabled()
    assert os.environ.get(lean_imports.ENV) is None
