"""Open a checkpoint: one ``.safetensors`` file, a folder with ``model.safetensors``, a sharded folder with
``model.safetensors.index.json``, or a folder of several ``*.safetensors`` files without an index.

Pickle weights (``pytorch_model.bin``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are refused with
``UnsafeFormatError`` unless ``allow_pickle=True`` (then loaded with ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from adaptkit.errors import CheckpointError, UnsafeFormatError
from adaptkit.io.dtypes import ITEMSIZE, dtype_code
from adaptkit.io.safetensors import SafetensorsFile, TensorInfo, _DuplicateKey, load_json_strict

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e.strerror})") from None
    try:
        return load_json_strict(text)
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: {what} has duplicate key {e.args[0]!r}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({str(e).splitlines()[0]})") from None


def _allowed_roots(folder: Path) -> list[Path]:
    """Where files of ``folder`` may resolve to: the folder itself, and, for a Hugging Face cache snapshot
    (``<repo>/snapshots/<revision>``), the repo's ``blobs`` folder its symlinks point into."""
    root = folder.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        roots.append((root.parent.parent / "blobs").resolve())
    return roots


def resolve_inside(folder: Path, rel: Any, where: str, what: str = "shard path") -> Path:
    """Validate a relative file name from an index (or listing) and return ``folder / rel``.

    Rules: a non-empty string, relative, no ``..`` component, resolves (after symlinks) inside the folder
    (or the HF cache ``blobs`` folder of a snapshot), and exists as a regular file.
    """
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{where}: {what} must be a non-empty string (got {rel!r})")
    if "\x00" in rel:
        raise CheckpointError(f"{where}: {what} {rel!r} contains a NUL byte")
    pure = PurePosixPath(rel.replace("\\", "/"))
    if pure.is_absolute() or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise CheckpointError(f"{where}: {what} {rel!r} is absolute; it must be relative to the checkpoint folder")
    if ".." in pure.parts:
        raise CheckpointError(f"{where}: {what} {rel!r} contains '..'; it must stay inside the checkpoint folder")
    path = folder / pure
    resolved = path.resolve()
    if not any(resolved == r or r in resolved.parents for r in _allowed_roots(folder)):
        raise CheckpointError(
            f"{where}: {what} {rel!r} resolves outside the checkpoint folder (symlink to {resolved})"
        )
    if not path.exists():
        raise CheckpointError(f"{where}: {what} {rel!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{where}: {what} {rel!r} is not a regular file")
    return path


class TensorIndex:
    """The read-only mapping protocol every checkpoint shares: tensor names in order, ``in``, iteration, length
    and ``info(name)`` over ``self._infos`` (name -> tensor info). ``_order()`` gives the names in order (the
    ``_infos`` keys unless a view reorders or filters), ``_label()`` names the checkpoint in errors."""

    _infos: dict[str, Any]

    def _order(self) -> Any:
        return self._infos

    def _label(self) -> Any:
        return getattr(self, "path", "checkpoint")

    def names(self) -> list[str]:
        return list(self._order())

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._order())

    def __len__(self) -> int:
        return len(self._order())

    def info(self, name: str) -> Any:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self._label()}: no tensor named {name!r}") from None


class Checkpoint(TensorIndex):
    """A set of named tensors spread over one or more files; tensors are read lazily.

    ``names()`` lists tensors in file order (files in order, tensors by data offset); ``info(name)`` gives
    a :class:`TensorInfo`; ``get(name)`` the tensor (a read-only view of the mapping for safetensors).
    ``source_format`` is ``None``: these are the stored floating-point weights (a dequantizing loader's
    checkpoint names the quantized format it read).
    """

    source_format: str | None = None
    loader: str = "adaptkit:safetensors"

    def __init__(
        self,
        path: Path,
        files: list[SafetensorsFile],
        *,
        config_path: Path | None = None,
        pickled: dict[str, Any] | None = None,
        pickled_infos: dict[str, TensorInfo] | None = None,
    ) -> None:
        self.path = path
        self._files = files
        self._where: dict[str, SafetensorsFile] = {}
        self._infos: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in f.infos.items():
                self._where[name] = f
                self._infos[name] = info
        self._pickled = pickled or {}
        if pickled_infos:
            self._infos.update(pickled_infos)
        self._config_path = config_path
        self._config: dict | None = None
        self._config_loaded = False

    @property
    def files(self) -> list[Path]:
        if self._pickled:
            seen: dict[Path, None] = {}
            for i in self._infos.values():
                seen.setdefault(i.file, None)
            return list(seen)
        return [f.path for f in self._files]

    @property
    def metadata(self) -> dict[str, str] | None:
        """``__metadata__`` of the first file (shards of one checkpoint normally share it)."""
        return self._files[0].metadata if self._files else None

    def get(self, name: str, *, copy: bool = False) -> Any:
        f = self._where.get(name)
        if f is not None:
            return f.get(name, copy=copy)
        if name in self._pickled:
            t = self._pickled[name]
            return t.clone() if copy else t
        raise CheckpointError(f"{self.path}: no tensor named {name!r}")

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    @property
    def config(self) -> dict | None:
        """``config.json`` beside the weights, parsed; ``None`` when there is none."""
        if not self._config_loaded:
            p = self._config_path
            if p is not None and p.is_file():
                cfg = _read_json(p, "config.json")
                if not isinstance(cfg, dict):
                    raise CheckpointError(f"{p}: config.json is not a JSON object")
                self._config = cfg
            self._config_loaded = True
        return self._config

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._pickled = {}

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._infos)} tensors in {len(self.files)} files)"


def _open_all(paths: list[Path]) -> list[SafetensorsFile]:
    opened: list[SafetensorsFile] = []
    try:
        for p in paths:
            opened.append(SafetensorsFile(p))
    except BaseException:
        for f in opened:
            f.close()
        raise
    return opened


def _open_index(folder: Path, index_path: Path) -> Checkpoint:
    where = str(index_path)
    index = _read_json(index_path, "index")
    if not isinstance(index, dict):
        raise CheckpointError(f"{where}: index is not a JSON object")
    if "weight_map" not in index:
        raise CheckpointError(f"{where}: index has no 'weight_map'")
    wm = index["weight_map"]
    if not isinstance(wm, dict):
        raise CheckpointError(f"{where}: 'weight_map' must be an object of tensor name -> file name")
    shard_paths: dict[str, Path] = {}
    for name, rel in wm.items():
        if not isinstance(rel, str) or rel not in shard_paths:
            shard_paths[rel] = resolve_inside(folder, rel, f"{where}: tensor {name!r}")
    # the same file reached by two spellings ("a.safetensors" / "./a.safetensors") counts once
    by_real: dict[Path, str] = {}
    for rel, p in shard_paths.items():
        by_real.setdefault(p.resolve(), rel)
    order = sorted(by_real.values(), key=lambda r: str(PurePosixPath(r)))
    files = _open_all([shard_paths[r] for r in order])
    try:
        canon = {rel: by_real[p.resolve()] for rel, p in shard_paths.items()}
        file_of = {r: f for r, f in zip(order, files)}
        for name, rel in wm.items():
            if name not in file_of[canon[rel]].infos:
                raise CheckpointError(
                    f"{where}: tensor {name!r} is mapped to {rel!r} but that file does not contain it"
                )
        owner: dict[str, str] = {}
        for r, f in zip(order, files):
            for name in f.infos:
                if name in owner:
                    raise CheckpointError(
                        f"{where}: tensor {name!r} is stored in two files ({owner[name]!r} and {r!r})"
                    )
                owner[name] = r
                if name not in wm:
                    raise CheckpointError(f"{where}: tensor {name!r} in {r!r} is not listed in the weight_map")
    except BaseException:
        for f in files:
            f.close()
        raise
    return Checkpoint(folder, files, config_path=folder / "config.json")


def _open_unindexed(folder: Path, paths: list[Path]) -> Checkpoint:
    for p in paths:
        resolve_inside(folder, p.name, str(folder), what="file")
    files = _open_all(paths)
    owner: dict[str, Path] = {}
    for f in files:
        for name in f.infos:
            if name in owner:
                for g in files:
                    g.close()
                raise CheckpointError(
                    f"{folder}: tensor {name!r} appears in two files ({owner[name].name} and {f.path.name}) "
                    "and there is no index to choose"
                )
            owner[name] = f.path
    return Checkpoint(folder, files, config_path=folder / "config.json")


def _load_pickle(folder: Path, paths: list[Path], *, path: Path | None = None) -> Checkpoint:
    import torch

    tensors: dict[str, Any] = {}
    infos: dict[str, TensorInfo] = {}
    for p in paths:
        try:
            try:
                obj = torch.load(p, weights_only=True, mmap=True, map_location="cpu")
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(p, weights_only=True, map_location="cpu")  # legacy (non-zip) format
        except Exception as e:  # the unpickler's errors vary; all mean "not a plain weights file"
            msg = " ".join(str(e).split())[:200]
            raise CheckpointError(f"{p}: cannot load with weights_only=True ({type(e).__name__}: {msg})") from None
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("state_dict", "model", "module"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
        if not isinstance(obj, dict):
            raise CheckpointError(f"{p}: does not hold a dict of tensors (got {type(obj).__name__})")
        for name, t in obj.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{p}: entry {name!r} is not a tensor ({type(t).__name__})")
            if name in tensors:
                raise CheckpointError(f"{folder}: tensor {name!r} appears in two pickle files")
            try:
                code = dtype_code(t.dtype)
            except ValueError as e:
                raise CheckpointError(f"{p}: tensor {name!r}: {e}") from None
            tensors[name] = t
            infos[name] = TensorInfo(name, code, tuple(t.shape), p, -1, t.numel() * ITEMSIZE[code])
    return Checkpoint(
        path or folder, [], config_path=folder / "config.json", pickled=tensors, pickled_infos=infos
    )


def _pickle_files(folder: Path) -> list[Path]:
    idx = folder / "pytorch_model.bin.index.json"
    if idx.is_file():
        index = _read_json(idx, "index")
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict):
            raise CheckpointError(f"{idx}: index has no 'weight_map' object")
        paths: dict[Path, None] = {}
        for name, rel in wm.items():
            paths.setdefault(resolve_inside(folder, rel, f"{idx}: tensor {name!r}"), None)
        return sorted(paths)
    return sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())


def _refuse_pickle(paths: list[Path], where: Path) -> None:
    names = ", ".join(p.name for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
    raise UnsafeFormatError(
        f"{where} contains only pickle weights ({names}); convert to safetensors or pass --allow-pickle"
    )


def open_checkpoint(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint folder or a single ``.safetensors`` file, validating every header and the index."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                _refuse_pickle([p], p)
            return _load_pickle(p.parent, [p], path=p)
        if p.name.endswith(".index.json"):
            return _open_index(p.parent, p)
        return Checkpoint(p, _open_all([p]), config_path=p.parent / "config.json")
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a file or directory")

    index = p / INDEX_NAME
    if index.exists():
        return _open_index(p, index)
    others = sorted(q for q in p.glob("*.safetensors.index.json"))
    if len(others) == 1:
        return _open_index(p, others[0])
    if len(others) > 1:
        raise CheckpointError(f"{p}: several index files ({', '.join(q.name for q in others)}) and no {INDEX_NAME}")
    single = p / SINGLE_NAME
    if single.exists():
        resolve_inside(p, SINGLE_NAME, str(p), what="file")
        return Checkpoint(p, _open_all([single]), config_path=p / "config.json")
    st = sorted(q for q in p.glob("*.safetensors") if not q.name.startswith("."))
    if st:
        return _open_unindexed(p, st)
    pickles = _pickle_files(p)
    if pickles:
        if not allow_pickle:
            _refuse_pickle(pickles, p)
        return _load_pickle(p, pickles)
    raise CheckpointError(f"{p}: no weights found (no *.safetensors, no {INDEX_NAME})")
