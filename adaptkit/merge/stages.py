"""Multi-stage merge configs (mergekit-multi's format): several YAML documents in one file, separated by
``---``, each a merge config with an optional ``name``. Stages run in file order; a later stage refers to an
earlier one by its name wherever a model may be named (``base_model``, ``models[].model``, slice sources,
``tokenizer_source``, ``tokenizer`` sources). The last document is the output; every other one must be named
and is merged into an intermediate folder (``--intermediate-dir``, else a temporary folder beside OUT that is
removed afterwards). Differences from mergekit-multi, deliberate: a stage may only refer to *earlier* stages
(mergekit sorts them topologically), and a reference that is neither an earlier stage nor a local model is an
error before anything runs. Imports no torch.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from adaptkit.config import MergeConfig, load_merge_config, parse_merge_config
from adaptkit.errors import ConfigError


@dataclass
class Stage:
    name: Optional[str]
    config: MergeConfig
    index: int  #: 0-based document index
    source: str  #: how messages name it

    @property
    def label(self) -> str:
        return f"stage {self.name!r}" if self.name else f"the final stage (document {self.index + 1})"


def references(cfg: MergeConfig) -> list[tuple[str, str]]:
    """(location, reference) of every model reference of a config."""
    out: list[tuple[str, str]] = []
    if cfg.base_model:
        out.append(("base_model", cfg.base_model))
    for i, m in enumerate(cfg.models or []):
        out.append((f"models[{i}].model", m.model))
    for i, s in enumerate(cfg.slices or []):
        if s.base_model:
            out.append((f"slices[{i}].base_model", s.base_model))
        for j, so in enumerate(s.sources):
            out.append((f"slices[{i}].sources[{j}].model", so.model))
    if cfg.tokenizer_source not in (None, "base", "union"):
        out.append(("tokenizer_source", cfg.tokenizer_source))
    if cfg.tokenizer is not None:
        if cfg.tokenizer.source not in ("base", "union"):
            out.append(("tokenizer.source", cfg.tokenizer.source))
        for tok, te in (cfg.tokenizer.tokens or {}).items():
            src = te.source
            ref = getattr(src, "model", None) if not isinstance(src, str) else src
            if ref:
                out.append((f"tokenizer.tokens[{tok!r}].source", ref))
    return out


def load_stages(path: str | Path) -> list[Stage]:
    """The stages of a config file; a plain single-document config is one unnamed stage."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        docs = None
    if docs is None or (len(docs) <= 1 and not (docs and isinstance(docs[0], dict) and "name" in docs[0])):
        return [Stage(None, load_merge_config(p), 0, p.name)]  # the single-document path, its messages
    stages: list[Stage] = []
    names: dict[str, int] = {}
    for k, raw in enumerate(docs):
        where = f"{p.name} (document {k + 1})"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: a merge config must be a YAML mapping, got {type(raw).__name__}")
        raw = dict(raw)
        name = raw.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ConfigError(f"{where}: name must be a non-empty string, got {name!r}")
        if name is not None:
            where = f"{p.name} (stage {name!r})"
            if name in names:
                raise ConfigError(f"{where}: the name {name!r} is used by document {names[name] + 1} too")
            names[name] = k
        elif k != len(docs) - 1:
            raise ConfigError(
                f"{where}: only the last document may be unnamed (it is the output); name this stage so a later "
                "one can refer to it"
            )
        stages.append(Stage(name, parse_merge_config(raw, source=where), k, where))
    for st in stages:
        for loc, ref in references(st.config):
            if ref in names and names[ref] >= st.index:
                later = "itself" if names[ref] == st.index else f"stage {ref!r}, which comes later (document {names[ref] + 1})"
                raise ConfigError(
                    f"{st.source}: {loc} refers to {later}; stages run in file order and may only use earlier ones"
                )
    return stages


def check_references(stages: list[Stage], config_dir: Path) -> None:
    """Every reference that is not an earlier stage must be a local model (checked before anything runs)."""
    from adaptkit.errors import CheckpointError
    from adaptkit.merge.models import resolve_model_path, split_adapter_ref

    names = {st.name for st in stages if st.name}
    for st in stages:
        for loc, ref in references(st.config):
            if ref in names:
                continue
            base, adapters = split_adapter_ref(ref, config_dir)
            try:
                for r in [base, *adapters]:
                    resolve_model_path(r, config_dir, st.source)
            except CheckpointError:
                raise ConfigError(
                    f"{st.source}: {loc} {ref!r} is neither an earlier stage ({', '.join(sorted(names)) or 'none'}) "
                    "nor a local model"
                ) from None


def substituted(cfg: MergeConfig, outputs: dict[str, Path]) -> MergeConfig:
    """``cfg`` with references to earlier stages replaced by their output folders (absolute paths)."""
    c = cfg.model_copy(deep=True)
    sub = lambda r: str(outputs[r]) if isinstance(r, str) and r in outputs else r  # noqa: E731
    c.base_model = sub(c.base_model)
    for m in c.models or []:
        m.model = sub(m.model)
    for s in c.slices or []:
        s.base_model = sub(s.base_model)
        for so in s.sources:
            so.model = sub(so.model)
    if c.tokenizer_source not in (None, "base", "union"):
        c.tokenizer_source = sub(c.tokenizer_source)
    if c.tokenizer is not None:
        c.tokenizer.source = sub(c.tokenizer.source)
        for te in (c.tokenizer.tokens or {}).values():
            if isinstance(te.source, str):
                te.source = sub(te.source)
            elif getattr(te.source, "model", None):
                te.source.model = sub(te.source.model)
    return c


def run_stages(
    stages: list[Stage],
    config_path: Path,
    out: Path,
    run_one: Callable[[MergeConfig, Path, Stage, bool], Any],
    *,
    intermediate_dir: Optional[Path] = None,
    force: bool = False,
) -> Any:
    """Run every stage in order: ``run_one(config, out, stage, is_final)`` plans and merges one config (with
    references to earlier stages already replaced); returns the final stage's result. Intermediates go to
    ``intermediate_dir/<name>`` (kept) or to a temporary folder beside ``out`` (removed)."""
    check_references(stages, config_path.parent)
    own_tmp = intermediate_dir is None
    if own_tmp:
        out.parent.mkdir(parents=True, exist_ok=True)
        inter = Path(tempfile.mkdtemp(prefix=f".{out.name}.stages-", dir=out.parent))
    else:
        inter = Path(intermediate_dir)
        inter.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, Path] = {}
    try:
        result = None
        for st in stages:
            final = st is stages[-1]
            cfg = substituted(st.config, outputs)
            target = out if final else inter / str(st.name)
            result = run_one(cfg, target, st, final)
            if st.name:
                outputs[st.name] = target.resolve()
        return result
    finally:
        if own_tmp:
            shutil.rmtree(inter, ignore_errors=True)

