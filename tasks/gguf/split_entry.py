"""Subprocess entry: rewrite one GGUF as llama.cpp split shards with gguf-py's own GGUFWriter.

Run by tasks/gguf/split.py as `python split_entry.py SRC DEST TENSOR_BUDGET` with the
resolved converter's gguf-py first on PYTHONPATH (the gguf-py of the same llama.cpp commit as the
runtime; it cannot be imported next to PyPI `gguf` in the flow's process, hence a subprocess). The
splitting itself is GGUFWriter's (`split_max_size`: a new shard when the next tensor would take the
shard's tensor bytes over the budget; shard names `<stem>-00001-of-0000N.gguf`; `split.no`,
`split.count`, `split.tensors.count` on every shard; the full metadata in the first one). This script
only copies the source's key/values and tensors (memory-mapped, in file order) into the writer.
It prints one JSON line with the shard names at the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(src: str, dest: str, budget: int) -> int:
    import gguf

    reader = gguf.GGUFReader(src, "r")
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        print(f"error: {src} has no general.architecture", file=sys.stderr)
        return 2
    writer = gguf.GGUFWriter(dest, arch_field.contents(), split_max_size=budget)
    skip = {
        gguf.Keys.General.ARCHITECTURE,
        gguf.Keys.Split.LLM_KV_SPLIT_NO,
        gguf.Keys.Split.LLM_KV_SPLIT_COUNT,
        gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT,
    }
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skip:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(field.contents())
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    names = [p.name for p in writer.format_shard_names(Path(dest))]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    print(json.dumps({"shards": names}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
