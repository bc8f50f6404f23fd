"""A lazy, validating safetensors reader over a read-only mmap.

The header is validated completely before any tensor is handed out (rules in specs/checkpoint-io.md); every
violation raises ``CheckpointError("<file>: <rule broken>")``. ``SafetensorsFile.get`` returns a zero-copy,
read-only view of the mapping (a copy only when a tensor's offset is not aligned to its item size).
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptkit.errors import CheckpointError
from adaptkit.io.dtypes import ITEMSIZE, known_codes, shape_numel, torch_dtype

#: Largest header accepted, as in the reference implementation (100 MB).
MAX_HEADER_SIZE = 100_000_000

METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``offset`` is the absolute byte offset of its data in ``file``.

    For tensors of a pickle checkpoint (``--allow-pickle``) ``offset`` is ``-1``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return shape_numel(self.shape)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def load_json_strict(text: str | bytes) -> Any:
    """``json.loads`` that rejects duplicate keys (``_DuplicateKey``) and NaN/Infinity (``ValueError``)."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(header: bytes, data_len: int, where: str, file: Path) -> tuple[dict[str, TensorInfo], dict | None]:
    """Validate a raw header (the bytes after the 8-byte length) against a data buffer of ``data_len`` bytes.

    Returns ``(infos in data order, metadata)``; ``where`` prefixes every error message.
    """

    def fail(rule: str) -> CheckpointError:
        return CheckpointError(f"{where}: {rule}")

    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"header is not valid UTF-8 (byte {e.start})") from None
    try:
        obj = load_json_strict(text)
    except _DuplicateKey as e:
        raise fail(f"header has duplicate key {e.args[0]!r}") from None
    except ValueError as e:
        raise fail(f"header is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise fail(f"header is not a JSON object (got a JSON {type(obj).__name__})")

    metadata = obj.pop(METADATA_KEY, None)
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise fail(f"{METADATA_KEY} must be an object of strings (got {type(metadata).__name__})")
        for k, v in metadata.items():
            if not isinstance(v, str):
                raise fail(f"{METADATA_KEY} value of {k!r} must be a string (got {type(v).__name__})")

    base = 0  # absolute offsets are filled in by the caller: data starts at 8 + len(header)
    entries: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    for name, entry in obj.items():
        if not isinstance(entry, dict):
            raise fail(f"tensor {name!r}: entry must be an object (got {type(entry).__name__})")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in entry:
                raise fail(f"tensor {name!r}: missing {key!r}")
        dtype = entry["dtype"]
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise fail(f"tensor {name!r}: unknown dtype {dtype!r} (known: {', '.join(known_codes())})")
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise fail(f"tensor {name!r}: shape must be a list of non-negative integers (got {shape!r})")
        offs = entry["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) and o >= 0 for o in offs)):
            raise fail(f"tensor {name!r}: data_offsets must be [begin, end] non-negative integers (got {offs!r})")
        begin, end = offs
        if end < begin:
            raise fail(f"tensor {name!r}: data_offsets end {end} is before begin {begin}")
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * ITEMSIZE[dtype]
        if end - begin != expected:
            raise fail(
                f"tensor {name!r}: byte count {end - begin} does not match {dtype} shape {list(shape)} "
                f"({expected} bytes)"
            )
        entries.append((begin, end, name, dtype, tuple(shape)))

    entries.sort(key=lambda e: (e[0], e[1]))
    pos = 0
    prev: tuple[int, int, str] | None = None
    for begin, end, name, _, _ in entries:
        if begin < pos:
            assert prev is not None
            raise fail(
                f"tensor {name!r} overlaps {prev[2]!r} (bytes {begin}-{end} vs {prev[0]}-{prev[1]})"
            )
        if begin > pos:
            after = f"after {prev[2]!r}" if prev else "at the start of the data"
            raise fail(f"gap of {begin - pos} unused bytes {after} (bytes {pos}-{begin} are not covered by any tensor)")
        if end > data_len:
            raise fail(
                f"tensor {name!r} ends at byte {end} past the end of the data buffer ({data_len} bytes; "
                "file truncated?)"
            )
        pos = end
        if end > begin or prev is None:
            prev = (begin, end, name)
    if pos != data_len:
        raise fail(f"{data_len - pos} trailing bytes after the last tensor (data buffer is {data_len} bytes)")

    infos = {
        name: TensorInfo(name, dtype, shape, file, base + begin, end - begin)
        for begin, end, name, dtype, shape in entries
    }
    return infos, metadata


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    chunks = []
    while n > 0:
        b = os.pread(fd, n, offset)
        if not b:
            break
        chunks.append(b)
        n -= len(b)
        offset += len(b)
    return b"".join(chunks)



def open_regular_file(path: str | os.PathLike[str], where: str) -> tuple[int, int]:
    """``(fd, size)`` of a regular file opened read-only (the caller closes ``fd``); a missing, unreadable or
    non-regular path is a one-line :class:`CheckpointError` prefixed with ``where``."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"{where}: cannot open ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{where}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size

class SafetensorsFile:
    """One ``.safetensors`` file: header validated on open, tensors mapped lazily.

    ``infos`` maps names to :class:`TensorInfo` in data (file) order; ``metadata`` is ``__metadata__`` or None.
    ``get(name)`` returns a read-only view of the mapping: never write into it (copy it first, or pass
    ``copy=True``). Usable as a context manager; ``close()`` is idempotent, and tensors handed out stay valid
    after it (the mapping lives until the last one is freed).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        where = str(self.path)
        fd, size = open_regular_file(self.path, where)
        try:
            if size < 8:
                raise CheckpointError(
                    f"{where}: file is truncated ({size} bytes, shorter than the 8-byte header length)"
                )
            (n,) = struct.unpack("<Q", _pread_exact(fd, 8, 0))
            if n > MAX_HEADER_SIZE:
                raise CheckpointError(f"{where}: header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit")
            if 8 + n > size:
                raise CheckpointError(
                    f"{where}: header length {n} runs past the end of the file ({size} bytes; truncated?)"
                )
            header = _pread_exact(fd, n, 8)
            if len(header) != n:  # pragma: no cover - file shrank while reading
                raise CheckpointError(f"{where}: file is truncated while reading the header")
            infos, metadata = parse_header(header, size - 8 - n, where, self.path)
        except BaseException:
            os.close(fd)
            raise
        data_start = 8 + n
        self.infos: dict[str, TensorInfo] = {
            k: TensorInfo(i.name, i.dtype, i.shape, i.file, data_start + i.offset, i.nbytes) for k, i in infos.items()
        }
        self.metadata: dict[str, str] | None = metadata
        self.header_size = n
        self.size = size
        self._fd: int | None = fd
        self._mm: mmap.mmap | None = None
        self._bytes: Any = None  # torch.uint8 tensor over the whole mapping
        self._lock = threading.Lock()

    # -- mapping -------------------------------------------------------------------------------------------
    def _byte_tensor(self) -> Any:
        b = self._bytes
        if b is not None:
            return b
        with self._lock:
            if self._bytes is None:
                if self._fd is None:
                    raise CheckpointError(f"{self.path}: file is closed")
                import torch

                self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
                with warnings.catch_warnings():
                    # the mapping is read-only on purpose: callers must not write into returned tensors
                    warnings.simplefilter("ignore", UserWarning)
                    self._bytes = torch.frombuffer(self._mm, dtype=torch.uint8)
            return self._bytes

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def keys(self) -> list[str]:
        return list(self.infos)

    def get(self, name: str, *, copy: bool = False) -> Any:
        """The tensor ``name`` (a read-only zero-copy view unless ``copy=True`` or its offset is unaligned)."""
        info = self.infos.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        import torch

        try:
            dtype = torch_dtype(info.dtype)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: tensor {name!r}: {e}") from None
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        if copy or info.offset % ITEMSIZE[info.dtype]:
            # one copy from the page cache into fresh (aligned, writable) memory; cheaper than faulting
            # the mapping in page by page and copying from it
            out = torch.empty(info.nbytes, dtype=torch.uint8)
            fd = self._fd
            if fd is None:
                raise CheckpointError(f"{self.path}: file is closed")
            mv = memoryview(out.numpy())
            done = 0
            while done < info.nbytes:
                k = os.preadv(fd, [mv[done : done + (1 << 30)]], info.offset + done)
                if k <= 0:
                    raise CheckpointError(f"{self.path}: file shrank while reading tensor {name!r}")
                done += k
            return out.view(dtype).view(info.shape)
        raw = self._byte_tensor()[info.offset : info.offset + info.nbytes]
        return raw.view(dtype).view(info.shape)

    def close(self) -> None:
        with self._lock:
            # Never mmap.close(): tensors handed out hold a reference to the mmap object (torch.frombuffer
            # does not keep the buffer exported, so close() would unmap memory they still point to).
            # Dropping our references unmaps it as soon as the last such tensor is freed.
            self._bytes = None
            self._mm = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self.infos)} tensors)"
