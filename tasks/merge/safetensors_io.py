"""Reading and writing safetensors files one tensor at a time (for the streaming merge).

Why hand-written: the `safetensors` library writes a file from a complete dict of tensors
(`save_file`/`save`), so writing a shard means holding the whole shard, plus its merged copy, in memory;
that is exactly the memory peak the streaming merge exists to avoid (measured in the issue: a
shard-by-shard merge peaked as high as peft itself). The format is simple and stable: an 8-byte
little-endian header length, a JSON header naming each tensor's dtype, shape and byte range, then the
raw bytes. Knowing every output tensor's dtype and shape up front (they are the base's), we write the
header first and then each tensor's bytes as soon as it is made, so only one tensor is ever in memory.

Reading goes through plain `read()` into a buffer rather than `safe_open`'s memory map, so the memory a
merge uses is visible as the process's own (anonymous) memory and nothing is hidden in mapped pages;
tensors that the merge leaves unchanged are copied byte for byte without being decoded at all.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tasks.core.errors import PermanentError

COPY_CHUNK = 8 * 1024 * 1024
MAX_HEADER = 100 * 1024 * 1024

# safetensors dtype names -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
TORCH_TO_ST = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor in a safetensors file: where its bytes are and what they mean."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsFile:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0


def read_header(path: Path | str) -> SafetensorsFile:
    """Parse a safetensors header and check that the file holds every byte it promises.

    A truncated or corrupt file fails here, naming the file, before any heavy work starts.
    """
    path = Path(path)
    size = path.stat().st_size
    hint = f"the file {path.name} is damaged or incomplete: download or copy it again"
    if size < 8:
        raise PermanentError(f"{path} is not a safetensors file ({size} bytes)", hint=hint)
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > MAX_HEADER or 8 + n > size:
            raise PermanentError(
                f"{path} is truncated or not a safetensors file (header of {n} bytes, file of {size})", hint=hint
            )
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PermanentError(f"{path}: unreadable safetensors header ({exc})", hint=hint) from None
    start = 8 + n
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        dtype = entry.get("dtype")
        if dtype not in DTYPES:
            raise PermanentError(
                f"{path}: tensor {name!r} has unsupported dtype {dtype!r}", hint="merge it with merge.backend: peft"
            )
        b, e = entry["data_offsets"]
        shape = tuple(int(s) for s in entry["shape"])
        if e - b != math.prod(shape) * DTYPES[dtype][1]:
            raise PermanentError(
                f"{path}: tensor {name!r} byte range does not match its shape {list(shape)}", hint=hint
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, start + b, start + e)
        data_end = max(data_end, e)
    if start + data_end > size:
        raise PermanentError(
            f"{path} is truncated: its header needs {start + data_end} bytes, the file has {size}",
            hint=hint,
        )
    return SafetensorsFile(path, tensors, metadata, start)


def read_tensor(info: TensorInfo, fh: BinaryIO | None = None, into: Any = None) -> Any:
    """The tensor's values, read (not mapped) into memory of this process: a new buffer, or the start of `into`
    (a uint8 torch tensor of at least info.nbytes, reused by the caller: a new buffer costs a page fault and
    the kernel's zeroing per page, more than the read itself)."""
    import torch

    dtype = getattr(torch, DTYPES[info.dtype][0])
    if info.numel == 0:
        return torch.empty(info.shape, dtype=dtype)
    buf = bytearray(info.nbytes) if into is None else memoryview(into.numpy())[: info.nbytes]
    own = fh is None
    fh = fh or open(info.file, "rb")
    try:
        fh.seek(info.start)
        got = fh.readinto(buf)
    finally:
        if own:
            fh.close()
    if got != info.nbytes:
        raise PermanentError(
            f"{info.file}: tensor {info.name!r} is cut short ({got} of {info.nbytes} bytes)",
            hint="the file is damaged: copy it again",
        )
    if into is not None:
        return into[: info.nbytes].view(dtype).reshape(info.shape)
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


def tensor_bytes(t: Any) -> memoryview:
    """The raw little-endian bytes of a tensor (no copy for a contiguous CPU tensor)."""
    import torch

    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


@dataclass(frozen=True)
class OutEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


def file_layout(entries: list[OutEntry], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int], int]:
    """(the file's first bytes: length + JSON header, each tensor's absolute offset, the data's size) of a
    safetensors file holding `entries` in this order: the one layout both writers below produce."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    rel: dict[str, int] = {}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        rel[e.name] = offset
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, like the library's own files
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {n: start + o for n, o in rel.items()}, offset


class StreamingWriter:
    """Write one safetensors file tensor by tensor, in the order the entries were given.

    The header (every tensor's dtype, shape and byte range) is written first; `write`/`copy_raw` then
    append each tensor's bytes and check they are the promised size; `close` checks all were written.
    """

    def __init__(self, path: Path | str, entries: Iterable[OutEntry], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.entries = list(entries)
        head, _, self.data_size = file_layout(self.entries, metadata)
        self._fh = open(self.path, "wb")
        self._fh.write(head)
        self._next = 0

    @property
    def total_size(self) -> int:
        return self.data_size

    def _expect(self, name: str) -> OutEntry:
        if self._next >= len(self.entries) or self.entries[self._next].name != name:
            want = self.entries[self._next].name if self._next < len(self.entries) else "nothing"
            raise RuntimeError(f"{self.path.name}: tensor {name!r} written out of order (expected {want})")
        e = self.entries[self._next]
        self._next += 1
        return e

    def write(self, name: str, tensor: Any) -> None:
        e = self._expect(name)
        if tuple(tensor.shape) != e.shape or TORCH_TO_ST.get(str(tensor.dtype).removeprefix("torch."), None) not in (
            e.dtype,
            None,
        ):
            raise RuntimeError(
                f"{self.path.name}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, header says "
                f"{e.shape} {e.dtype}"
            )
        data = tensor_bytes(tensor) if e.nbytes else memoryview(b"")
        if data.nbytes != e.nbytes:
            raise RuntimeError(f"{self.path.name}: tensor {name!r} has {data.nbytes} bytes, header says {e.nbytes}")
        self._fh.write(data)

    def copy_raw(self, name: str, src: TensorInfo, fh: BinaryIO) -> None:
        """Copy a tensor's bytes from another safetensors file unchanged, in bounded chunks."""
        e = self._expect(name)
        if src.nbytes != e.nbytes:
            raise RuntimeError(
                f"{self.path.name}: tensor {name!r} has {src.nbytes} bytes in {src.file.name}, header says {e.nbytes}"
            )
        fh.seek(src.start)
        left = src.nbytes
        while left:
            chunk = fh.read(min(COPY_CHUNK, left))
            if not chunk:
                raise PermanentError(
                    f"{src.file}: tensor {name!r} is cut short", hint="the file is damaged: copy it again"
                )
            self._fh.write(chunk)
            left -= len(chunk)

    def close(self) -> None:
        if self._next != len(self.entries):
            self._fh.close()
            raise RuntimeError(f"{self.path.name}: only {self._next} of {len(self.entries)} tensors were written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def abort(self) -> None:
        self._fh.close()


class PlacedWriter:
    """Write one safetensors file whose tensors arrive in any order: the header is written first (the same bytes
    `StreamingWriter` writes for these entries), then each tensor at its precomputed offset (`pwrite`, or the
    kernel's `copy_file_range` for bytes taken unchanged from another file); thread-safe, since each call
    writes its own range. `close` checks every tensor was written once.

    Why: the fused merge writes merged/ from inside llama.cpp's converter (tasks/merge/fused.py), which reads
    the tensors in its own order (by name), not the file's.
    """

    def __init__(self, path: Path | str, entries: Iterable[OutEntry], metadata: dict[str, str] | None = None):
        import threading

        self.path = Path(path)
        self.entries = {e.name: e for e in entries}
        head, self.offsets, self.data_size = file_layout(list(self.entries.values()), metadata)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._fd, head)
        os.ftruncate(self._fd, len(head) + self.data_size)
        self.written: set[str] = set()
        self._lock = threading.Lock()

    @property
    def total_size(self) -> int:
        return self.data_size

    def _claim(self, name: str, nbytes: int) -> OutEntry:
        e = self.entries.get(name)
        if e is None:
            raise RuntimeError(f"{self.path.name}: no tensor {name!r} in its header")
        if nbytes != e.nbytes:
            raise RuntimeError(f"{self.path.name}: tensor {name!r} has {nbytes} bytes, header says {e.nbytes}")
        return e

    def _done(self, name: str) -> None:
        with self._lock:
            self.written.add(name)

    def write(self, name: str, tensor: Any) -> None:
        e = self.entries.get(name)
        if e is not None and (
            tuple(tensor.shape) != e.shape
            or TORCH_TO_ST.get(str(tensor.dtype).removeprefix("torch."), None) not in (e.dtype, None)
        ):
            raise RuntimeError(
                f"{self.path.name}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, header says "
                f"{e.shape} {e.dtype}"
            )
        data = tensor_bytes(tensor) if tensor.numel() else memoryview(b"")
        self.write_bytes(name, data)

    def write_bytes(self, name: str, data: Any) -> None:
        data = memoryview(data).cast("B")
        self._claim(name, data.nbytes)
        at, done = self.offsets[name], 0
        while done < data.nbytes:
            done += os.pwrite(self._fd, data[done:], at + done)
        self._done(name)

    def copy_raw(self, name: str, src: TensorInfo, src_fd: int) -> None:
        """A tensor's bytes from another safetensors file, unchanged (in the kernel where it can)."""
        self._claim(name, src.nbytes)
        at, done = self.offsets[name], 0
        while done < src.nbytes:
            left = src.nbytes - done
            try:
                n = os.copy_file_range(src_fd, self._fd, left, src.start + done, at + done)
            except OSError:  # another filesystem or an old kernel: through user space
                n = os.pwrite(self._fd, os.pread(src_fd, min(COPY_CHUNK, left), src.start + done), at + done)
            if n == 0:
                raise PermanentError(
                    f"{src.file}: tensor {name!r} is cut short", hint="the file is damaged: copy it again"
                )
            done += n
        self._done(name)

    def missing(self) -> list[str]:
        return [n for n in self.entries if n not in self.written]

    def close(self) -> None:
        missing = self.missing()
        if missing:
            os.close(self._fd)
            raise RuntimeError(f"{self.path.name}: {len(missing)} tensor(s) were never written: {missing[:3]}")
        os.fsync(self._fd)
        os.close(self._fd)

    def abort(self) -> None:
        os.close(self._fd)
