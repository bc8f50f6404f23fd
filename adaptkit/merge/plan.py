"""Planning a merge from tensor headers only.

``build_plan(config, config_path, registry, host=...)`` opens the models named by a
:class:`~adaptkit.config.MergeConfig` through the host's loader registry (lazily: headers, no tensor data),
validates the merge method's parameters, and produces a :class:`MergePlan`: one
:class:`~adaptkit.merge.tasks.TensorTask` per output tensor with its inputs, resolved parameters, output dtype
and shape, plus the list of input tensors deliberately left out and why. The accounting rule: *every* tensor
of every input is merged, passed through, or excluded by an explicit config rule (``exclude`` patterns, a
slice's ``layer_range``, a tied ``lm_head``); anything else is an error listing the tensors. No architecture
table is involved: the tensor names come from the headers, so nothing is silently dropped.

The pieces live beside this module: :mod:`~adaptkit.merge.models` (references, opening),
:mod:`~adaptkit.merge.params` (parameter values per tensor), :mod:`~adaptkit.merge.slices` (which inputs make
which output tensor), :mod:`~adaptkit.merge.tied` (embedding tying), :mod:`~adaptkit.merge.output_config` and
:mod:`~adaptkit.merge.aux_sources` (what accompanies the weights). Imports no torch.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from adaptkit.config import MergeConfig, dump_merge_config
from adaptkit.errors import CheckpointError, ConfigError
from adaptkit.merge import budget
from adaptkit.merge.aux_sources import AuxSource, resolve_aux_source, resolve_chat_template
from adaptkit.merge.models import ModelEntry, ModelSet, OpenModel
from adaptkit.merge.output_config import output_config
from adaptkit.merge.params import tensor_params, validate_config_parameters
from adaptkit.merge.slices import (
    Slice,
    Source,
    TensorGroup,
    check_layer_ranges,
    index_layers,
    is_pre_layer,
    models_form_groups,
    nonlayer_groups,
    single_stack,
    slice_layer_groups,
)
from adaptkit.merge.tasks import FLOAT_CODES, TensorTask
from adaptkit.merge.tied import TIED_HEAD, check_untied_has_head, drop_tied_head
from adaptkit.registry import MergeMethod, MergerRegistry


@dataclass
class MergePlan:
    config: MergeConfig
    config_path: Path | None
    method: MergeMethod
    method_name: str  #: as written in the config (short or qualified)
    models: list[ModelEntry]
    base_index: Optional[int]
    tasks: list[TensorTask]
    excluded: list[tuple[str, str, str]]  #: (model ref, tensor, reason)
    out_config: dict[str, Any] | None
    aux: Optional[AuxSource]  #: where tokenizer / generation config / chat template files come from
    chat_template: Optional[str] = None  #: the resolved ``chat_template`` (None: keep the copied one)
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    method_qualified: str = ""  #: ``distribution:name`` of the method (who provides it)
    #: one-line warnings (parameters the method ignores); ``--strict`` turns them into errors
    warnings: list[str] = field(default_factory=list)
    #: how the vocabulary-indexed tensors were re-indexed (``adaptkit.merge.vocab``), None when not needed
    vocab: Any = None

    @property
    def merged_models(self) -> set[int]:
        """Indices of the models whose tensors go into the output (the others give files only)."""
        return {mi for t in self.tasks for mi, _ in t.all_inputs()}

    @property
    def aux_source(self) -> Optional[Path]:
        return self.aux.path if self.aux is not None else None

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def bytes_read(self) -> int:
        return sum(t.in_bytes for t in self.tasks)

    @property
    def bytes_written(self) -> int:
        return sum(t.out_bytes for t in self.tasks)

    def peak_memory_estimate(self, device: str = "cpu") -> int:
        return budget.peak_memory_estimate(self.tasks)

    def describe_models(self) -> list[dict[str, Any]]:
        """Each input model: reference, path, loader, source format, whether dequantized, whether the base."""
        return [{**m.describe(), "base": i == self.base_index} for i, m in enumerate(self.models)]

    def summary(self, device: str = "cpu") -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for t in self.tasks:
            kinds[t.kind] = kinds.get(t.kind, 0) + 1
        reasons: dict[str, int] = {}
        for _, _, r in self.excluded:
            reasons[r] = reasons.get(r, 0) + 1
        return {
            "method": self.method_name,
            "models": self.describe_models(),
            "base_model": str(self.models[self.base_index].path) if self.base_index is not None else None,
            "tensors": len(self.tasks),
            "tensor_kinds": kinds,
            "excluded": len(self.excluded),
            "excluded_reasons": reasons,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "peak_memory_estimate": self.peak_memory_estimate(device),
            "num_hidden_layers": (self.out_config or {}).get("num_hidden_layers"),
            "seed": self.seed,
            "notes": list(self.notes),
            "warnings": list(self.warnings),
        }

    def resolved_config(self) -> MergeConfig:
        """The config with model references replaced by absolute paths (mergekit-compatible)."""
        cfg = self.config.model_copy(deep=True)
        mapping = {m.ref: str(m.path) for m in self.models}
        if cfg.base_model in mapping:
            cfg.base_model = mapping[cfg.base_model]
        for m in cfg.models or []:
            m.model = mapping.get(m.model, m.model)
        for s in cfg.slices or []:
            if s.base_model in mapping:
                s.base_model = mapping[s.base_model]
            for so in s.sources:
                so.model = mapping.get(so.model, so.model)
        if cfg.tokenizer is not None:  # the tokenizer block's model references too
            if cfg.tokenizer.source in mapping:
                cfg.tokenizer.source = mapping[cfg.tokenizer.source]
            for te in (cfg.tokenizer.tokens or {}).values():
                if isinstance(te.source, str) and te.source in mapping:
                    te.source = mapping[te.source]
                elif getattr(te.source, "model", None) in mapping:
                    te.source.model = mapping[te.source.model]
        if cfg.tokenizer_source in mapping:
            cfg.tokenizer_source = mapping[cfg.tokenizer_source]
        elif cfg.tokenizer_source not in (None, "base", "union") and self.aux_source is not None:
            cfg.tokenizer_source = str(self.aux_source)
        return cfg

    def resolved_yaml(self) -> str:
        return dump_merge_config(self.resolved_config())

    def close(self) -> None:
        for m in self.models:
            try:
                m.ckpt.close()
            except Exception:  # noqa: BLE001
                pass


# --------------------------------------------------------------------------------------------------


class _Planner:
    def __init__(self, cfg: MergeConfig, config_path: Path | None, entry: Any, models: ModelSet,
                 known_params: frozenset[str] = frozenset()) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.src = models.src
        self.method: MergeMethod = entry.component
        self.method_qualified: str = entry.qualified_name
        self.method_name = cfg.merge_method
        self.models = models
        self.label = models.label
        self.excluded: list[tuple[str, str, str]] = []
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.known_params = known_params
        self.tasks: list[TensorTask] = []
        self.exclude_patterns = list(cfg.exclude or [])

    def plan(self, seed: int) -> MergePlan:
        cfg, method = self.cfg, self.method
        raw_warnings: list[str] = []
        validate_config_parameters(method, cfg, self.src, known_elsewhere=self.known_params, warnings=raw_warnings)
        self.warnings = _merge_warnings(raw_warnings)
        base = self.models.index(cfg.base_model) if cfg.base_model else None
        if method.requires_base and base is None and not any(s.base_model for s in cfg.slices or []):
            raise ConfigError(f"{self.src}: merge method {cfg.merge_method!r} needs a base_model")
        slices = self._slices(base)
        participants = sorted({s.model for sl in slices for s in sl.sources} | ({base} if base is not None else set()))
        self._check_architectures(participants)
        out_idx = base if base is not None else slices[0].sources[0].model
        for i, s in enumerate(cfg.slices or []):
            if s.residual_weight is not None:
                self.warnings.append(
                    f"{self.src}: slices[{i}].residual_weight is ignored: it has no effect (in mergekit 0.1.5 either)"
                )
        from adaptkit.merge.vocab import apply_alignment, plan_alignment

        vocab = plan_alignment(cfg, self.models, participants, base, out_idx, self.src)
        if vocab is not None:
            apply_alignment(vocab, self.models)
            self.notes.extend(vocab.notes)
        self.used: dict[int, set[str]] = {i: set() for i in range(len(self.models))}
        self.missing: dict[int, list[str]] = {}
        self.out_tied = self.models[out_idx].tied

        if cfg.models:
            self._plan_models_form(slices[0])
            out_layers = None
        else:
            out_layers = self._plan_slices_form(slices)
        self._account()
        self._note_tiebreak()
        if not self.tasks:
            raise CheckpointError(f"{self.src}: the merge produces no tensors")
        out_config = output_config(
            self.models[out_idx].config, out_layers=out_layers, slices=slices,
            source_configs=[m.config for m in self.models.models], tasks=self.tasks, out_tied=self.out_tied,
        )
        tok_source = cfg.tokenizer.source if cfg.tokenizer is not None else cfg.tokenizer_source
        aux = resolve_aux_source(tok_source, self.models, out_idx, participants, base is not None, self.src)
        template = resolve_chat_template(cfg.chat_template, [m.path for m in self.models.models])
        return MergePlan(
            config=cfg, config_path=self.config_path, method=method, method_name=cfg.merge_method,
            models=self.models.models, base_index=base, tasks=self.tasks, excluded=self.excluded,
            out_config=out_config, aux=aux, chat_template=template, seed=seed, notes=self.notes,
            method_qualified=self.method_qualified, warnings=self.warnings, vocab=vocab,
        )

    def _note_tiebreak(self) -> None:
        """A method with a magnitude tie-break on 16-bit inputs, the tie-break not set: say that mergekit's
        choice differs (specs/merge-math.md, "How often the default differs")."""
        p = self.method.param("magnitude_tiebreak")
        if p is None or not getattr(self, "has_16bit", False):
            return
        blocks = [self.cfg.parameters] + [s.parameters for s in self.cfg.slices or []]
        if any(b and "magnitude_tiebreak" in b for b in blocks):
            return
        self.notes.append(
            f"equal magnitudes at the trim threshold are kept lowest index first (magnitude_tiebreak: {p.default}); "
            "on 16-bit checkpoints mergekit keeps others on ~0.2-11 % of elements; set magnitude_tiebreak: sort "
            "and election_precision: compute for mergekit's exact tensors"
        )

    # -- structure ---------------------------------------------------------------------------------
    def _slices(self, base: Optional[int]) -> list[Slice]:
        cfg = self.cfg
        slices: list[Slice] = []
        if cfg.models:
            sources: list[Source] = []
            seen: set[int] = set()
            for i, m in enumerate(cfg.models):
                idx = self.models.index(m.model)
                if idx in seen:
                    raise ConfigError(f"{self.src}: models[{i}]: model {m.model!r} is listed twice")
                seen.add(idx)
                sources.append(Source(idx, m.parameters))
            if base is not None and base not in seen:
                # mergekit adds a base_model missing from `models` to the merged models, whatever the method
                # (a `linear` merge averages it in with the top-level parameters): so does adaptkit
                sources.append(Source(base, None))
                if not self.method.uses_base:
                    self.notes.append(
                        f"base_model {self.label(base)!r} is not listed under models: merged like any model "
                        "(as mergekit does), with the top-level parameters"
                    )
            slices.append(Slice(sources, base, None, "models"))
        else:
            for i, s in enumerate(cfg.slices or []):
                sb = self.models.index(s.base_model) if s.base_model else base
                srcs = [Source(self.models.index(so.model), so.parameters, tuple(so.layer_range)) for so in s.sources]
                slices.append(Slice(srcs, sb, s.parameters, f"slices[{i}]"))
        return slices

    def _check_architectures(self, used: list[int]) -> None:
        """Participants must share the architecture (config.json), before any tensor is compared."""
        ref = used[0]
        rc = self.models[ref].config or {}
        for mi in used[1:]:
            mc = self.models[mi].config or {}
            for key in ("architectures", "model_type", "hidden_size"):
                if key in rc and key in mc and rc[key] != mc[key]:
                    a, b = rc[key], mc[key]
                    if isinstance(a, list):
                        a, b = ",".join(map(str, a)), ",".join(map(str, b))
                    raise CheckpointError(
                        f"mismatched architectures: {key} is {a} in {self.label(ref)!r} but {b} in {self.label(mi)!r}"
                    )

    def _participants(self, sl: Slice) -> tuple[Optional[int], list[Source]]:
        """(base model index if the method uses it, non-base sources)."""
        method = self.method
        base = sl.base if method.uses_base else None
        if base is not None:
            others = [s for s in sl.sources if s.model != base]
            if not any(s.model == base for s in sl.sources):
                raise ConfigError(
                    f"{self.src}: {sl.where}: base model {self.label(base)!r} must be one of the slice's sources"
                )
        else:
            others = list(sl.sources)
        n = len(others)
        what = "non-base models" if base is not None else "models"
        if n < method.min_models:
            raise ConfigError(
                f"{self.src}: {sl.where}: merge method {self.method_name!r} needs at least {method.min_models} "
                f"{what}, got {n}"
            )
        if method.max_models is not None and n > method.max_models:
            added = ("" if sl.where != "models" or base is not None or sl.base is None
                     or any(m.model == self.cfg.base_model for m in self.cfg.models or [])
                     else " (the base_model counts: like mergekit, adaptkit merges a base_model that is not "
                          "listed under models as one of the models)")
            raise ConfigError(
                f"{self.src}: {sl.where}: merge method {self.method_name!r} takes at most {method.max_models} "
                f"{what}, got {n}{added}"
            )
        return base, others

    def _check_tying(self, models: list[int]) -> None:
        check_untied_has_head([(self.label(m), self.models[m].ckpt, self.models[m].tied) for m in models],
                              self.out_tied)

    def _is_excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude_patterns)

    def _selected(self, mi: int) -> list[str]:
        """The tensor names of model ``mi`` that take part: not excluded by a pattern or the tying rule."""
        names = [n for n in self.models[mi].ckpt.names() if not self._is_excluded(n)]
        entry = self.models[mi]
        return drop_tied_head(names, entry.ref, entry.tied, self.out_tied, self.excluded)

    # -- the two config forms ----------------------------------------------------------------------
    def _plan_models_form(self, sl: Slice) -> None:
        base, others = self._participants(sl)
        models = ([base] if base is not None else []) + [s.model for s in others]
        self._check_tying(models)
        stacks = self.models[models[0]].stacks
        for mi in models[1:]:
            if self.models[mi].stacks != stacks:
                a, b = self.label(models[0]), self.label(mi)
                raise CheckpointError(
                    f"models {a!r} and {b!r} have different layer counts "
                    f"({stacks or 'none'} vs {self.models[mi].stacks or 'none'}); use 'slices' for frankenmerges"
                )
        for group in models_form_groups(models, self._selected, stacks):
            self._add_task(group, sl, base, others)

    def _plan_slices_form(self, slices: list[Slice]) -> int:
        stacks = lambda mi: self.models[mi].stacks  # noqa: E731
        prefix = single_stack(slices, stacks, self.src)
        check_layer_ranges(slices, prefix, stacks, self.label, self.src)
        layer_names: dict[int, dict[int, dict[str, str]]] = {}
        nonlayer: dict[int, list[str]] = {}
        for mi in range(len(self.models)):
            layer_names[mi], nonlayer[mi] = index_layers(self._selected(mi), prefix)

        def plan_nonlayer(sl: Slice, keep: Any) -> None:
            base, others = self._participants(sl)
            models = ([base] if base is not None else []) + [s.model for s in others]
            self._check_tying(models)
            for group in nonlayer_groups(models, nonlayer, keep):
                self._add_task(group, sl, base, others)

        plan_nonlayer(slices[0], is_pre_layer)
        out_layer = 0
        for sl in slices:
            base, others = self._participants(sl)
            srcs = ([next(s for s in sl.sources if s.model == base)] if base is not None else []) + others
            groups, n = slice_layer_groups(srcs, prefix, layer_names, out_layer)
            for group in groups:
                self._add_task(group, sl, base, others)
            out_layer += n
        plan_nonlayer(slices[-1], lambda n: not is_pre_layer(n))
        return out_layer

    # -- one output tensor -------------------------------------------------------------------------
    def _add_task(self, group: TensorGroup, sl: Slice, base: Optional[int], others: list[Source]) -> None:
        """Plan one output tensor from the same-named (or renumbered) tensors of the participants."""
        in_names = group.in_names
        models = ([base] if base is not None else []) + [s.model for s in others]
        infos = {}
        for mi in models:
            name = in_names[mi]
            ck = self.models[mi].ckpt
            if name not in ck:
                self.missing.setdefault(mi, []).append(name)
                for x in models:
                    if in_names[x] in self.models[x].ckpt:
                        self.used[x].add(in_names[x])
                return
            infos[mi] = ck.info(name)
        ref = infos[models[0]]
        for mi in models[1:]:
            inf = infos[mi]
            if tuple(inf.shape) != tuple(ref.shape):
                raise CheckpointError(self._shape_message(in_names[mi], models[0], ref, mi, inf))
        dtypes = {infos[m].dtype for m in models}
        self.has_16bit = getattr(self, "has_16bit", False) or bool(dtypes & {"BF16", "F16"})
        is_float = all(d in FLOAT_CODES for d in dtypes)
        listed = lambda: ", ".join(f"{self.label(m)}: {infos[m].dtype}" for m in models)  # noqa: E731
        if any(d in FLOAT_CODES for d in dtypes) and not is_float:
            raise CheckpointError(
                f"tensor {ref.name!r} mixes floating-point and non-float dtypes across models ({listed()})"
            )
        for mi in models:
            self.used[mi].add(in_names[mi])
        in_bytes = sum(infos[m].nbytes for m in models)
        if not is_float:
            if len(dtypes) > 1:
                raise CheckpointError(f"non-float tensor {ref.name!r} has different dtypes across models ({listed()})")
            self.tasks.append(
                TensorTask(group.out_name, ref.dtype, tuple(ref.shape), [(m, in_names[m]) for m in models], None,
                           [], {}, group.layer_index, kind="identical", in_bytes=in_bytes)
            )
            return
        per_model, gp = tensor_params(
            self.method, [(self.label(s.model), s.params, in_names[s.model]) for s in others], sl.params,
            self.cfg.parameters, group.out_name, group.t, self.src,
        )
        self.tasks.append(
            TensorTask(
                out_name=group.out_name,
                dtype=self.cfg.out_dtype_code or infos[models[0]].dtype,
                shape=tuple(ref.shape),
                inputs=[(s.model, in_names[s.model]) for s in others],
                base=(base, in_names[base]) if base is not None else None,
                params=per_model,
                global_params=gp,
                layer_index=group.layer_index,
                kind="copy" if self._is_identity(models, per_model, gp) else "merge",
                in_bytes=in_bytes,
                # fp64 when an input is fp64 or the config asks for float64 (mergekit computes in `dtype`)
                compute_float64="F64" in dtypes or self._f64_requested,
            )
        )

    @property
    def _f64_requested(self) -> bool:
        from adaptkit.config import DTYPE_ALIASES

        return any(v is not None and DTYPE_ALIASES[v.lower()] == "F64" for v in (self.cfg.dtype, self.cfg.out_dtype))

    def _is_identity(self, models: list[int], per_model: list[dict[str, Any]], gp: dict[str, Any]) -> bool:
        """A single input whose parameters equal the method's declared ``identity_params``: copied as is."""
        ident = self.method.identity_params
        if ident is None or len(models) != 1:
            return False
        values = {**gp, **(per_model[0] if per_model else {})}
        return all(values.get(k, v) == v for k, v in ident)

    def _shape_message(self, name: str, m0: int, i0: Any, m1: int, i1: Any) -> str:
        a, b = self.label(m0), self.label(m1)
        if is_pre_layer(name) or name.endswith(TIED_HEAD):
            if len(i0.shape) == 2 and len(i1.shape) == 2 and i0.shape[1] == i1.shape[1]:
                return (
                    f"tensor {name!r}: vocabulary sizes differ ({i0.shape[0]} in {a!r} vs {i1.shape[0]} in {b!r}); "
                    "set tokenizer_source (base, union or a model) to align the rows by token string"
                )
        return f"tensor {name!r}: shape {list(i0.shape)} in {a!r} vs {list(i1.shape)} in {b!r}"

    # -- accounting --------------------------------------------------------------------------------
    def _account(self) -> None:
        """Every tensor of every input model is used or excluded by a rule; else an error."""
        if self.missing:
            mi, names = next(iter(self.missing.items()))
            total = sum(len(v) for v in self.missing.values())
            shown = ", ".join(repr(n) for n in names[:6]) + (f", ... ({total} in all)" if total > 6 else "")
            others = f" (and {len(self.missing) - 1} more models)" if len(self.missing) > 1 else ""
            raise CheckpointError(
                f"model {self.label(mi)!r} lacks tensors that other inputs have{others}: {shown}; "
                "add them to 'exclude' to leave them out"
            )
        excluded_names = {(m, n) for m, n, _ in self.excluded}
        slices_form = bool(self.cfg.slices)
        orphans: list[str] = []
        for mi, entry in enumerate(self.models.models):
            if not self.used[mi] and not slices_form:
                # a model that takes no part (e.g. a base the method ignores): nothing of it is merged
                self.notes.append(f"model {entry.ref!r} provides no tensors (merge method does not use it)")
                continue
            for n in entry.ckpt.names():
                if n in self.used[mi] or (entry.ref, n) in excluded_names:
                    continue
                if self._is_excluded(n):
                    self.excluded.append((entry.ref, n, "matches an 'exclude' pattern"))
                elif slices_form:
                    self.excluded.append((entry.ref, n, "outside the configured slices (layer_range)"))
                else:
                    orphans.append(f"{entry.ref}:{n}")
        if orphans:
            shown = ", ".join(orphans[:8]) + (f", ... ({len(orphans)} in all)" if len(orphans) > 8 else "")
            raise CheckpointError(f"input tensors not accounted for by the merge plan: {shown}")


def build_plan(
    cfg: MergeConfig,
    config_path: Path | str | None,
    registry: Optional[MergerRegistry] = None,
    *,
    host: Any = None,
    open_model: Optional[OpenModel] = None,
    seed: int = 0,
    allow_pickle: bool = False,
    strict: bool = False,
) -> MergePlan:
    """Plan a merge (headers only). Raises ConfigError / CheckpointError with one-line messages.

    Models are opened with ``open_model`` (default: ``host.open_model``) and the method is looked up in
    ``registry`` (default: ``host.mergers``); ``host`` defaults to a new plugin host
    (:func:`adaptkit.plugins.get_plugin_manager`), so one host serves the registry and the loaders.
    ``strict``: a parameter the method ignores (known to another registered method) is an error, not a warning.
    """
    if host is None and (registry is None or open_model is None):
        from adaptkit.plugins import get_plugin_manager

        host = get_plugin_manager()
    if registry is None:
        registry = host.mergers
    loaders = host.loaders if host is not None else None
    if open_model is None:
        open_model = host.open_model
    path = Path(config_path) if config_path is not None else None
    src = path.name if path else "config"
    try:
        entry = registry.entry(cfg.merge_method)
    except ConfigError as exc:
        raise ConfigError(f"{src}: merge_method: {exc.one_line()}") from None
    known = frozenset(p.name for e in registry.entries() for p in e.component.params)
    models = ModelSet(open_model, path.parent if path else None, src, allow_pickle=allow_pickle,
                      loaders=loaders)
    try:
        plan = _Planner(cfg, path, entry, models, known).plan(seed)
        if strict and plan.warnings:
            raise ConfigError(f"{plan.warnings[0]} (--strict)")
        return plan
    except BaseException:
        models.close()
        raise


def _merge_warnings(raw: list[str]) -> list[str]:
    """One line per ignored parameter name (its locations listed), in first-seen order."""
    import re

    by_key: dict[str, list[str]] = {}
    head: dict[str, str] = {}
    for w in raw:
        m = re.match(r"^(.*?): parameter '(.*?)' in (.*?) is ignored: (.*)$", w)
        if not m:
            by_key.setdefault(w, [])
            continue
        src, key, loc, why = m.groups()
        by_key.setdefault(key, []).append(loc)
        head[key] = f"{src}: parameter {key!r} in \0 is ignored: {why}"
    out = []
    for key, locs in by_key.items():
        out.append(head[key].replace("\0", ", ".join(locs)) if key in head else key)
    return out
