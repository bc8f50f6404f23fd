"""Streaming sharded safetensors writer: memory of one tensor, not one shard.

All shapes and dtypes are known up front (``TensorSpec``), so the shard plan, every header and every offset
are computed before the first tensor arrives. Each shard file is created with its full header and pre-sized
(``ftruncate``); ``write(name, tensor)`` then ``pwrite``s the tensor's bytes at its offset, in any order, from
any thread. ``close()`` checks that every tensor was written exactly once, fsyncs, and writes the HF index
(``model.safetensors.index.json``) when there is more than one shard. Layout rules: specs/checkpoint-io.md.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from adaptkit.errors import OutputError
from adaptkit.io.dtypes import ITEMSIZE, dtype_code, known_codes, shape_numel

DEFAULT_MAX_SHARD_SIZE = 5 * 2**30
_PWRITE_CHUNK = 1 << 30  # Linux caps one write at ~2 GiB


@dataclass(frozen=True)
class TensorSpec:
    """The name, safetensors dtype code and shape of one tensor to be written."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return shape_numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    @classmethod
    def of(cls, name: str, tensor: Any) -> "TensorSpec":
        """The spec of a torch tensor."""
        return cls(name, dtype_code(tensor.dtype), tuple(int(d) for d in tensor.shape))


def _check_specs(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    out: list[TensorSpec] = []
    seen: set[str] = set()
    for s in specs:
        if not isinstance(s.name, str) or s.name == "__metadata__":
            raise ValueError(f"invalid tensor name {s.name!r}")
        if s.name in seen:
            raise ValueError(f"tensor {s.name!r} is specified twice")
        seen.add(s.name)
        if s.dtype not in ITEMSIZE:
            raise ValueError(f"tensor {s.name!r}: unknown dtype {s.dtype!r} (known: {', '.join(known_codes())})")
        shape = tuple(s.shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"tensor {s.name!r}: shape must be non-negative integers (got {s.shape!r})")
        out.append(s if type(s.shape) is tuple else TensorSpec(s.name, s.dtype, shape))
    return out


def plan_shards(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Assign tensors to shards in spec order: a new shard starts when the next tensor would push the current
    one past ``max_shard_size`` bytes of tensor data; a tensor larger than the limit gets a shard of its own."""
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be positive (got {max_shard_size})")
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for s in specs:
        if shards[-1] and used + s.nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(s)
        used += s.nbytes
    return shards


def shard_names(n: int, basename: str = "model") -> list[str]:
    """HF shard file names: ``model.safetensors`` alone, else ``model-00001-of-0000N.safetensors``."""
    if n == 1:
        return [f"{basename}.safetensors"]
    return [f"{basename}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def build_header(layout: list[TensorSpec], metadata: dict[str, str] | None) -> tuple[bytes, dict[str, int]]:
    """The padded header bytes (without the 8-byte length) and each tensor's offset in the data buffer.

    Tensors are laid out in the given order; the header is padded with spaces so the data starts at a multiple
    of 8 bytes."""
    obj: dict[str, Any] = {}
    if metadata is not None:
        obj["__metadata__"] = metadata
    offsets: dict[str, int] = {}
    pos = 0
    for s in layout:
        obj[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        offsets[s.name] = pos
        pos += s.nbytes
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return raw, offsets


class ShardedWriter:
    """Write a (possibly sharded) safetensors checkpoint into ``directory`` (normally a temp dir from
    :func:`adaptkit.io.atomic_output_dir`).

    Within a shard, tensors are stored by decreasing item size (stable in spec order) so every tensor's data is
    aligned to its item size and readers can map it without copying. ``write`` raises ``ValueError`` for an
    unknown name, a second write of the same tensor, or a dtype/shape that differs from the spec.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        specs: list[TensorSpec],
        *,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
        basename: str = "model",
    ) -> None:
        self.directory = Path(directory)
        self.specs = _check_specs(specs)
        meta: dict[str, str] = {"format": "pt"}
        for k, v in (metadata or {}).items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"safetensors metadata must map str to str (got {k!r}: {v!r})")
            meta[k] = v
        self.metadata = meta
        self.basename = basename
        plan = plan_shards(self.specs, max_shard_size)
        names = shard_names(len(plan), basename)
        self.shards: list[Path] = [self.directory / n for n in names]
        self.index_path: Path | None = (
            self.directory / f"{basename}.safetensors.index.json" if len(plan) > 1 else None
        )
        self._slots: dict[str, tuple[int, int, TensorSpec]] = {}  # name -> (shard index, abs offset, spec)
        self._state: dict[str, int] = {}  # 0 pending, 1 being written, 2 done
        self._lock = threading.Lock()
        self._fds: list[int] = []
        self._closed = False
        self._created: list[Path] = []
        try:
            for i, (shard, path) in enumerate(zip(plan, self.shards)):
                layout = sorted(shard, key=lambda s: -ITEMSIZE[s.dtype])  # stable: spec order within a size
                header, offsets = build_header(layout, self.metadata)
                data_len = sum(s.nbytes for s in shard)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
                except OSError as e:
                    raise OutputError(f"{path}: cannot create shard ({e.strerror})") from None
                self._fds.append(fd)
                self._created.append(path)
                prefix = len(header).to_bytes(8, "little") + header
                self._pwrite_all(fd, memoryview(prefix), 0, path)
                try:
                    os.ftruncate(fd, len(prefix) + data_len)
                except OSError as e:
                    size = len(prefix) + data_len
                    raise OutputError(f"{path}: cannot size shard to {size} bytes ({e.strerror})") from None
                for s in shard:
                    self._slots[s.name] = (i, len(prefix) + offsets[s.name], s)
                    self._state[s.name] = 0
        except BaseException:
            self.abort()
            raise

    # -- writing -------------------------------------------------------------------------------------------
    @staticmethod
    def _pwrite_all(fd: int, mv: memoryview, offset: int, path: Path) -> None:
        done, n = 0, len(mv)
        while done < n:
            try:
                k = os.pwrite(fd, mv[done : done + _PWRITE_CHUNK], offset + done)
            except OSError as e:
                raise OutputError(f"{path}: write failed ({e.strerror})") from None
            if k <= 0:  # pragma: no cover
                raise OutputError(f"{path}: write made no progress")
            done += k

    def _claim(self, name: str) -> tuple[int, int, TensorSpec]:
        with self._lock:
            if self._closed:
                raise ValueError(f"cannot write tensor {name!r}: the writer is closed")
            slot = self._slots.get(name)
            if slot is None:
                raise ValueError(f"cannot write tensor {name!r}: it is not in the writer's specs")
            if self._state[name] != 0:
                raise ValueError(f"cannot write tensor {name!r}: it was already written")
            self._state[name] = 1
            return slot

    def _finish(self, name: str, ok: bool) -> None:
        with self._lock:
            self._state[name] = 2 if ok else 0

    def write(self, name: str, tensor: Any) -> None:
        """Write one tensor (any device/layout; it must match its spec's dtype and shape exactly)."""
        slot = self._slots.get(name)
        if slot is not None:
            spec = slot[2]
            try:
                code = dtype_code(tensor.dtype)
            except ValueError:
                code = str(tensor.dtype)
            if code != spec.dtype:
                raise ValueError(f"cannot write tensor {name!r}: dtype {code} does not match the planned {spec.dtype}")
            if tuple(tensor.shape) != spec.shape:
                raise ValueError(
                    f"cannot write tensor {name!r}: shape {list(tensor.shape)} does not match the planned "
                    f"{list(spec.shape)}"
                )
        i, offset, spec = self._claim(name)
        ok = False
        try:
            if spec.nbytes:
                import torch

                t = tensor.detach()
                if t.device.type != "cpu":
                    t = t.to("cpu")
                if t.is_neg():
                    t = t.resolve_neg()
                t = t.contiguous().reshape(-1).view(torch.uint8)
                self._pwrite_all(self._fds[i], memoryview(t.numpy()), offset, self.shards[i])
            ok = True
        finally:
            self._finish(name, ok)

    def write_bytes(self, name: str, data: Any) -> None:
        """Write one tensor's raw little-endian bytes (a bytes-like object of exactly the spec's size)."""
        i, offset, spec = self._claim(name)
        ok = False
        try:
            mv = memoryview(data).cast("B")
            if len(mv) != spec.nbytes:
                raise ValueError(f"cannot write tensor {name!r}: got {len(mv)} bytes, the spec needs {spec.nbytes}")
            self._pwrite_all(self._fds[i], mv, offset, self.shards[i])
            ok = True
        finally:
            self._finish(name, ok)

    # -- finishing -----------------------------------------------------------------------------------------
    def pending(self) -> list[str]:
        """Names not yet (completely) written, in spec order."""
        with self._lock:
            return [s.name for s in self.specs if self._state[s.name] != 2]

    @property
    def files(self) -> list[Path]:
        """The files this writer produces (shards, then the index if any)."""
        return self.shards + ([self.index_path] if self.index_path else [])

    def close(self) -> list[Path]:
        """Check completeness, fsync every shard, write the index; returns the files written."""
        with self._lock:
            if self._closed:
                return self.files
            missing = [s.name for s in self.specs if self._state[s.name] != 2]
            self._closed = True
        if missing:
            self.abort()
            shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise OutputError(f"{self.directory}: {len(missing)} planned tensors were never written ({shown})")
        try:
            for fd, path in zip(self._fds, self.shards):
                try:
                    os.fsync(fd)
                except OSError as e:
                    raise OutputError(f"{path}: fsync failed ({e.strerror})") from None
            fds, self._fds = self._fds, []
            for fd in fds:
                os.close(fd)
            if self.index_path is not None:
                self._write_index()
            _fsync_dir(self.directory)
        except BaseException:
            self.abort()
            raise
        return self.files

    def _write_index(self) -> None:
        assert self.index_path is not None
        weight_map = {name: self.shards[self._slots[name][0]].name for name in sorted(self._slots)}
        index = {"metadata": {"total_size": sum(s.nbytes for s in self.specs)}, "weight_map": weight_map}
        data = (json.dumps(index, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            fd = os.open(self.index_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise OutputError(f"{self.index_path}: cannot create index ({e.strerror})") from None
        self._created.append(self.index_path)
        try:
            self._pwrite_all(fd, memoryview(data), 0, self.index_path)
            os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        """Close every file and delete what this writer created (idempotent)."""
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, []
            created, self._created = self._created, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        for p in created:
            try:
                p.unlink()
            except OSError:
                pass

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"ShardedWriter({str(self.directory)!r}, {len(self.specs)} tensors in {len(self.shards)} shards)"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
