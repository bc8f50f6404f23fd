"""The input models of a merge: references, paths, and opening them through the loader registry.

A model reference in a config is a local folder or checkpoint file (a ``.gguf`` file, a single
``.safetensors`` file), absolute or relative to the working directory (mergekit's rule; the config's folder
when it exists only there; an error when both exist and differ); adaptkit never downloads, so a
Hub-style id that is not a local path is an error saying so. Each distinct path is opened once, lazily
(headers only), with ``open_model`` -- the plugin host's :meth:`~adaptkit.plugins.PluginHost.open_model`,
which picks the loader (safetensors, quantized checkpoints and GGUF files dequantized on load, a plugin's
format) and records it on the checkpoint (``loader``, ``source_format``). Imports no torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from adaptkit.errors import CheckpointError, ConfigError, PluginError
from adaptkit.merge.slices import stacks_of
from adaptkit.merge.tied import is_tied

_HUB_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

OpenModel = Callable[..., Any]  #: ``open_model(path, **options) -> checkpoint`` (``PluginHost.open_model``)


def _candidates(ref: str, base_dir: Path | None) -> list[Path]:
    """Where a reference may point: as written (absolute), else relative to the working directory (mergekit's
    rule) and then to the config file's folder."""
    p = Path(ref).expanduser()
    if p.is_absolute():
        return [p]
    out = [Path.cwd() / p]
    if base_dir is not None and (Path(base_dir) / p).absolute() != out[0].absolute():
        out.append(Path(base_dir) / p)
    return out


def _exists(ref: str, base_dir: Path | None) -> bool:
    return any(c.exists() for c in _candidates(ref, base_dir))


def split_adapter_ref(ref: str, base_dir: Path | None) -> tuple[str, list[str]]:
    """mergekit's adapter reference ``"BASE+ADAPTER[+ADAPTER...]"`` -> (base, adapters). A path that exists as
    written (relative to the working directory or ``base_dir``) may contain ``+`` and is a plain reference;
    otherwise the longest existing base prefix wins."""
    if "+" not in ref or _exists(ref, base_dir):
        return ref, []
    parts = ref.split("+")
    for i in range(len(parts) - 1, 0, -1):
        if _exists("+".join(parts[:i]), base_dir):
            return "+".join(parts[:i]), parts[i:]
    return parts[0], parts[1:]


def resolve_model_path(ref: str, base_dir: Path | None, src: str) -> Path:
    """The absolute local path of a model reference (a folder or a checkpoint file, no adapters).

    A relative reference resolves against the working directory, as mergekit does; when it does not exist
    there, against the config file's folder (``base_dir``; mergekit would fail). When both exist and are
    different things, the reference is ambiguous: a ConfigError, so the same command never opens a different
    model than mergekit would without saying so."""
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"{src}: a model reference must be a non-empty string")
    cands = _candidates(ref, base_dir)
    found = [c for c in cands if c.exists()]
    if len(found) == 2 and found[0].resolve() != found[1].resolve():
        raise ConfigError(
            f"{src}: model path {ref!r} is ambiguous: it exists both relative to the working directory "
            f"({found[0].resolve()}) and to the config file's folder ({found[1].resolve()}); write an absolute path"
        )
    if found:
        return found[0].resolve()
    looked = " and ".join(str(c) for c in cands)
    if _HUB_RE.match(ref) and not ref.startswith((".", "/", "~")):
        raise CheckpointError(
            f"{src}: model {ref!r} is not a local folder (adaptkit never downloads; looked for {looked})"
        )
    raise CheckpointError(f"{src}: model folder or file not found: {ref!r} (looked for {looked})")


@dataclass
class ModelEntry:
    """One distinct input model."""

    ref: str  #: as first written in the config (messages name it)
    path: Path
    ckpt: Any  #: the opened checkpoint (``adaptkit.io.Checkpoint`` interface; lazy)
    config: dict[str, Any] | None
    stacks: dict[str, int] = field(default_factory=dict)  #: layer-stack prefix -> number of layers
    loader: str = "adaptkit:safetensors"  #: qualified name of the loader that opened it
    source_format: Optional[str] = None  #: the quantized format it was dequantized from (None: float weights)
    #: its loader computes tensors on read (declares ``dequantizes``: GGUF, quantized checkpoints), so a block of
    #: rows costs as much as the whole tensor
    decoded_on_read: bool = False

    @property
    def dequantized(self) -> bool:
        """Whether its weights were dequantized from a quantized format (``source_format`` is set)."""
        return self.source_format is not None

    @property
    def tied(self) -> bool:
        return is_tied(self.config, self.ckpt)

    def files(self) -> list[dict[str, Any]]:
        """Name (relative to the model folder) and size of each file its tensors come from."""
        paths = getattr(self.ckpt, "files", None) or ([self.path] if self.path.is_file() else [])
        root = self.path if self.path.is_dir() else self.path.parent
        out = []
        for p in paths:
            p = Path(p)
            try:
                name = p.relative_to(root).as_posix()
            except ValueError:
                name = p.name
            try:
                size = p.stat().st_size
            except OSError:
                size = None
            out.append({"name": name, "size": size})
        return out

    def describe(self) -> dict[str, Any]:
        return {"ref": self.ref, "path": str(self.path), "loader": self.loader,
                "source_format": self.source_format, "dequantized": self.dequantized}


class ModelSet:
    """The distinct models of a merge, opened on first reference (one entry per path; every reference that
    names the same path maps to it)."""

    def __init__(self, open_model: OpenModel, base_dir: Path | None, src: str, *, allow_pickle: bool = False,
                 loaders: Any = None) -> None:
        self.open_model = open_model
        self.base_dir = base_dir
        self.src = src
        self.allow_pickle = allow_pickle
        self.loaders = loaders  #: the loader registry (to know which loaders dequantize), if known
        self.models: list[ModelEntry] = []
        self._by_path: dict[tuple[Path, tuple[Path, ...]], int] = {}
        self._by_ref: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.models)

    def __getitem__(self, i: int) -> ModelEntry:
        return self.models[i]

    def index(self, ref: str) -> int:
        """The index of the model ``ref`` names, opening it on first use."""
        if ref in self._by_ref:
            return self._by_ref[ref]
        if not isinstance(ref, str) or not ref.strip():
            raise ConfigError(f"{self.src}: a model reference must be a non-empty string")
        base_ref, adapter_refs = split_adapter_ref(ref, self.base_dir)
        path = resolve_model_path(base_ref, self.base_dir, self.src)
        adapters = tuple(resolve_model_path(a, self.base_dir, self.src) for a in adapter_refs)
        key = (path, adapters)
        if key in self._by_path:
            idx = self._by_path[key]
        else:
            idx = len(self.models)
            self.models.append(self._open(ref, path, adapters))
            self._by_path[key] = idx
        self._by_ref[ref] = idx
        return idx

    def known(self, ref: str) -> Optional[int]:
        """The index of ``ref`` if a config reference already named it (opens nothing)."""
        return self._by_ref.get(ref)

    def label(self, i: int) -> str:
        return self.models[i].ref

    def _open(self, ref: str, path: Path, adapters: tuple[Path, ...] = ()) -> ModelEntry:
        options = {"allow_pickle": True} if self.allow_pickle else {}
        try:
            ckpt = self.open_model(path, **options)
            if adapters:  # mergekit's "base+adapter": the base with each adapter merged in, computed on read
                from adaptkit.adapters.view import AdaptedCheckpoint

                try:
                    ckpt = AdaptedCheckpoint(ckpt, list(adapters), close_base=True)
                except BaseException:
                    _close(ckpt)
                    raise
        except (CheckpointError, PluginError, ConfigError) as exc:
            raise type(exc)(f"model {ref!r}: {exc.one_line()}") from None
        try:
            loader = str(getattr(ckpt, "loader", None) or "adaptkit:safetensors")
            source_format = getattr(ckpt, "source_format", None)
            decoded = bool(adapters) or source_format is not None or self._loader_dequantizes(loader)
            cfg = ckpt.config
            return ModelEntry(ref=ref, path=path, ckpt=ckpt, config=cfg, stacks=stacks_of(ckpt.names()),
                              loader=loader, source_format=source_format, decoded_on_read=decoded)
        except BaseException:
            _close(ckpt)
            raise

    def _loader_dequantizes(self, loader: str) -> bool:
        if self.loaders is None:
            return False
        try:
            return bool(self.loaders.get(loader).dequantizes)
        except Exception:  # noqa: BLE001 - a name the registry does not know: not declared
            return False

    def close(self) -> None:
        for m in self.models:
            _close(m.ckpt)


def _close(ckpt: Any) -> None:
    try:
        ckpt.close()
    except Exception:  # noqa: BLE001
        pass
