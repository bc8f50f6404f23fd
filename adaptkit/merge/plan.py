"""Planning a merge from tensor headers only.

``build_plan(config, config_path, registry)`` resolves the models named by a :class:`~adaptkit.config.MergeConfig`
(local folders only), opens their checkpoints lazily (headers, no tensor data), validates the merge
method's parameters, and produces a :class:`MergePlan`: one :class:`TensorTask` per output tensor with its
inputs, resolved parameters, output dtype and shape, plus the list of input tensors deliberately left out
and why. The accounting rule: *every* tensor of every input is merged, passed through, or excluded by an
explicit config rule (``exclude`` patterns, a slice's ``layer_range``, a tied ``lm_head``); anything else
is an error listing the tensors. No architecture table is involved: the tensor names come from the
headers, so nothing is silently dropped.

Imports no torch.
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from adaptkit.config import COND_KEYS, MergeConfig, dump_merge_config, nearest_hint
from adaptkit.errors import CheckpointError, ConfigError
from adaptkit.registry import MergeMethod, MergerRegistry, Param

FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<idx>\d+)\.(?P<rest>.+)$")
_HUB_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_PRE_RE = re.compile(r"(embed|wte|wpe|word_embeddings)")
TIED_HEAD = "lm_head.weight"


def split_layer(name: str) -> tuple[str, int, str] | None:
    """``"model.layers.3.mlp.up_proj.weight"`` -> ``("model.layers", 3, "mlp.up_proj.weight")``."""
    m = _LAYER_RE.match(name)
    if not m:
        return None
    return m.group("prefix"), int(m.group("idx")), m.group("rest")


# --------------------------------------------------------------------------------------------------
@dataclass
class ModelEntry:
    """One distinct input model."""

    ref: str  #: as written in the config
    path: Path
    ckpt: Any  #: adaptkit.io.Checkpoint (lazy)
    config: dict[str, Any] | None
    stacks: dict[str, int] = field(default_factory=dict)  #: layer-stack prefix -> number of layers

    @property
    def label(self) -> str:
        return self.ref


@dataclass
class TensorTask:
    """One output tensor: which input tensors make it and how."""

    out_name: str
    dtype: str  #: output safetensors dtype code
    shape: tuple[int, ...]
    inputs: list[tuple[int, str]]  #: (model index, input tensor name) of the non-base participants
    base: Optional[tuple[int, str]]  #: (model index, name) of the base tensor, if the method uses it
    params: list[dict[str, Any]]
    global_params: dict[str, Any]
    layer_index: Optional[int]
    kind: str = "merge"  #: "merge" (call the method), "copy" (single input, no math), "identical" (non-float)
    in_bytes: int = 0
    compute_float64: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def out_bytes(self) -> int:
        from adaptkit.io.dtypes import ITEMSIZE

        return self.numel * ITEMSIZE[self.dtype]

    def all_inputs(self) -> list[tuple[int, str]]:
        return ([self.base] if self.base else []) + list(self.inputs)


@dataclass
class MergePlan:
    config: MergeConfig
    config_path: Path | None
    method: MergeMethod
    method_name: str
    models: list[ModelEntry]
    base_index: Optional[int]
    tasks: list[TensorTask]
    excluded: list[tuple[str, str, str]]  #: (model ref, tensor, reason)
    out_config: dict[str, Any] | None
    aux_source: Optional[Path]  #: folder whose tokenizer / generation config / chat template files are copied
    seed: int = 0
    notes: list[str] = field(default_factory=list)

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def bytes_read(self) -> int:
        return sum(t.in_bytes for t in self.tasks)

    @property
    def bytes_written(self) -> int:
        return sum(t.out_bytes for t in self.tasks)

    def peak_memory_estimate(self, device: str = "cpu") -> int:
        """Working memory of the largest tensor group: its inputs upcast to the compute dtype, the method's
        scratch (about two more copies), the rounded output, plus the prefetch window (small groups only)."""
        from adaptkit.merge.engine import PREFETCH_MAX_BYTES

        peak = 0
        for t in self.tasks:
            item = 8 if t.compute_float64 else 4
            n = len(t.all_inputs())
            if t.kind == "merge":
                w = (n + 3) * t.numel * item + t.out_bytes
            else:
                w = t.out_bytes * 2
            peak = max(peak, w)
        return peak + PREFETCH_MAX_BYTES

    def summary(self, device: str = "cpu") -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for t in self.tasks:
            kinds[t.kind] = kinds.get(t.kind, 0) + 1
        reasons: dict[str, int] = {}
        for _, _, r in self.excluded:
            reasons[r] = reasons.get(r, 0) + 1
        return {
            "method": self.method_name,
            "models": [str(m.path) for m in self.models],
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
        }

    def resolved_yaml(self) -> str:
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
        if cfg.tokenizer_source in mapping:
            cfg.tokenizer_source = mapping[cfg.tokenizer_source]
        elif cfg.tokenizer_source not in (None, "base", "union") and self.aux_source is not None:
            cfg.tokenizer_source = str(self.aux_source)
        return dump_merge_config(cfg)

    def close(self) -> None:
        for m in self.models:
            try:
                m.ckpt.close()
            except Exception:  # noqa: BLE001
                pass


# --------------------------------------------------------------------------------------------------
# model references


def resolve_model_path(ref: str, base_dir: Path | None, src: str) -> Path:
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"{src}: a model reference must be a non-empty string")
    if "+" in ref and not Path(ref).exists():
        raise ConfigError(f"{src}: model {ref!r}: LoRA references ('model+adapter') are not supported")
    p = Path(ref).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    if p.exists():
        return p.resolve()
    if _HUB_RE.match(ref) and not ref.startswith((".", "/", "~")):
        raise CheckpointError(
            f"{src}: model {ref!r} is not a local folder (adaptkit never downloads; "
            f"looked for {p})"
        )
    raise CheckpointError(f"{src}: model folder not found: {ref!r} (looked for {p})")


def _num_layers_from_config(cfg: dict[str, Any] | None) -> Optional[int]:
    if not cfg:
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        v = cfg.get(key)
        if isinstance(v, int):
            return v
    tc = cfg.get("text_config")
    if isinstance(tc, dict):
        return _num_layers_from_config(tc)
    return None


def _stacks(names: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        sp = split_layer(n)
        if sp:
            out[sp[0]] = max(out.get(sp[0], 0), sp[1] + 1)
    return out


# --------------------------------------------------------------------------------------------------
# parameters


def _coerce_scalar(p: Param, value: Any, where: str) -> Any:
    if p.type in (int, float) and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            pass
    return p.validate(value, where)


def _validate_setting(p: Param, setting: Any, where: str) -> None:
    """Check a parameter setting's structure and every scalar in it."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            raise ConfigError(f"{where}: parameter {p.name!r} is an empty list")
        if all(isinstance(e, dict) for e in setting):
            for i, cond in enumerate(setting):
                for k in cond:
                    if k not in COND_KEYS:
                        raise ConfigError(
                            f"{where}: unknown key {k!r} in {p.name}[{i}]{nearest_hint(k, COND_KEYS)}"
                        )
                if "value" not in cond:
                    raise ConfigError(f"{where}: {p.name}[{i}] needs a 'value' (with an optional 'filter')")
                f = cond.get("filter")
                if f is not None and not isinstance(f, str):
                    raise ConfigError(f"{where}: {p.name}[{i}].filter must be a string, got {f!r}")
                v = cond["value"]
                if isinstance(v, (dict,)) or (isinstance(v, list) and any(isinstance(e, (dict, list)) for e in v)):
                    raise ConfigError(f"{where}: {p.name}[{i}].value must be a scalar or a list of scalars")
                _validate_setting(p, v, f"{where}")
            return
        if any(isinstance(e, (dict, list)) for e in setting):
            raise ConfigError(
                f"{where}: parameter {p.name!r} mixes filter entries and plain values; "
                "use a list of '- filter: ... value: ...' entries"
            )
        if len(setting) > 1 and not p.gradient:
            raise ConfigError(f"{where}: parameter {p.name!r} does not accept a gradient (list of values)")
        for e in setting:
            _coerce_scalar(p, e, where)
        return
    if setting is None:
        raise ConfigError(f"{where}: parameter {p.name!r} has no value")
    _coerce_scalar(p, setting, where)


def evaluate_setting(p: Param, setting: Any, tensor_name: str, t: float, where: str) -> Any:
    """A setting's value for one tensor: filters select (first match wins, substring of the tensor name,
    ``*`` or no filter match all); a numeric list is a gradient interpolated linearly at ``t`` in [0, 1]
    over its evenly spaced anchors; a non-numeric list picks ``values[int(t * (n - 1))]``. Returns None when
    no filter matches (the next scope is consulted)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if setting and all(isinstance(e, dict) for e in setting):
            for cond in setting:
                f = cond.get("filter")
                if f is None or f == "*" or (tensor_name and f in tensor_name):
                    return evaluate_setting(p, cond["value"], tensor_name, t, where)
            return None
        values = [_coerce_scalar(p, e, where) for e in setting]
        if len(values) == 1:
            return values[0]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        result = (1 - frac) * values[i0] + frac * values[i1]
        if p.type is int:
            result = round(result)
        return _coerce_scalar(p, result, where)
    return _coerce_scalar(p, setting, where)


def _resolve(p: Param, scopes: list[dict[str, Any] | None], tensor_name: str, t: float, where: str) -> Any:
    for scope in scopes:
        if scope and p.name in scope:
            v = evaluate_setting(p, scope[p.name], tensor_name, t, where)
            if v is not None:
                return v
    if p.required:
        raise ConfigError(f"{where}: missing required parameter {p.name!r} (for tensor {tensor_name})")
    return p.default


def validate_parameter_block(
    method: MergeMethod, method_name: str, block: dict[str, Any] | None, where: str, *, per_model: bool
) -> None:
    """``where`` is ``"<file>: <location>"``; messages read ``<file>: unknown key 'x' in <location>; ...``."""
    if not block:
        return
    src, _, loc = where.partition(": ")
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: must be a mapping of parameter names to values")
    names = {p.name for p in method.params}
    for key, setting in block.items():
        p = method.param(str(key))
        if p is None:
            if not names:
                raise ConfigError(f"{where}: merge method {method_name!r} takes no parameters (got {key!r})")
            raise ConfigError(f"{src}: unknown key {key!r} in {loc}{nearest_hint(key, names)}")
        if per_model and p.scope == "global":
            raise ConfigError(
                f"{where}: parameter {key!r} of {method_name!r} is global; set it in the top-level 'parameters'"
            )
        _validate_setting(p, setting, where)


# --------------------------------------------------------------------------------------------------
# the planner


@dataclass
class _Source:
    model: int
    params: dict[str, Any] | None
    layer_range: Optional[tuple[int, int]] = None


@dataclass
class _Slice:
    sources: list[_Source]
    base: Optional[int]
    params: dict[str, Any] | None
    where: str


class _Planner:
    def __init__(
        self,
        cfg: MergeConfig,
        config_path: Path | None,
        registry: MergerRegistry,
        *,
        seed: int,
        allow_pickle: bool,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.src = config_path.name if config_path else "config"
        self.base_dir = config_path.parent if config_path else Path.cwd()
        self.registry = registry
        self.seed = seed
        self.allow_pickle = allow_pickle
        self.models: list[ModelEntry] = []
        self._by_path: dict[Path, int] = {}
        self._by_ref: dict[str, int] = {}
        self.excluded: list[tuple[str, str, str]] = []
        self.notes: list[str] = []

    # -- models ------------------------------------------------------------------------------------
    def model(self, ref: str) -> int:
        if ref in self._by_ref:
            return self._by_ref[ref]
        path = resolve_model_path(ref, self.base_dir, self.src)
        if path in self._by_path:
            idx = self._by_path[path]
        else:
            from adaptkit.io import open_checkpoint

            try:
                ckpt = open_checkpoint(path, allow_pickle=self.allow_pickle)
            except CheckpointError as exc:
                raise type(exc)(f"model {ref!r}: {exc.one_line()}") from None
            cfg = ckpt.config
            entry = ModelEntry(ref=ref, path=path, ckpt=ckpt, config=cfg, stacks=_stacks(ckpt.names()))
            idx = len(self.models)
            self.models.append(entry)
            self._by_path[path] = idx
        self._by_ref[ref] = idx
        return idx

    def label(self, i: int) -> str:
        return self.models[i].ref

    # -- main ----------------------------------------------------------------------------------------
    def plan(self) -> MergePlan:
        cfg = self.cfg
        try:
            method = self.registry.get(cfg.merge_method)
        except ConfigError as exc:
            raise ConfigError(f"{self.src}: merge_method: {exc.one_line()}") from None
        self.method = method
        self.method_name = cfg.merge_method

        validate_parameter_block(method, cfg.merge_method, cfg.parameters, f"{self.src}: parameters", per_model=False)
        for i, m in enumerate(cfg.models or []):
            validate_parameter_block(
                method, cfg.merge_method, m.parameters, f"{self.src}: models[{i}].parameters", per_model=True
            )
        for i, s in enumerate(cfg.slices or []):
            validate_parameter_block(
                method, cfg.merge_method, s.parameters, f"{self.src}: slices[{i}].parameters", per_model=False
            )
            for j, so in enumerate(s.sources):
                validate_parameter_block(
                    method,
                    cfg.merge_method,
                    so.parameters,
                    f"{self.src}: slices[{i}].sources[{j}].parameters",
                    per_model=True,
                )

        base = self.model(cfg.base_model) if cfg.base_model else None
        if method.requires_base and base is None and not any(s.base_model for s in cfg.slices or []):
            raise ConfigError(f"{self.src}: merge method {cfg.merge_method!r} needs a base_model")

        slices: list[_Slice] = []
        if cfg.models:
            sources: list[_Source] = []
            seen: set[int] = set()
            for i, m in enumerate(cfg.models):
                idx = self.model(m.model)
                if idx in seen:
                    raise ConfigError(f"{self.src}: models[{i}]: model {m.model!r} is listed twice")
                seen.add(idx)
                sources.append(_Source(idx, m.parameters))
            if base is not None and base not in seen and method.uses_base:
                sources.append(_Source(base, None))
            slices.append(_Slice(sources, base, None, "models"))
        else:
            for i, s in enumerate(cfg.slices or []):
                sb = self.model(s.base_model) if s.base_model else base
                srcs = [_Source(self.model(so.model), so.parameters, tuple(so.layer_range)) for so in s.sources]
                slices.append(_Slice(srcs, sb, s.parameters, f"slices[{i}]"))

        self._check_architectures(slices, base)
        out_idx = base if base is not None else slices[0].sources[0].model
        self.tasks: list[TensorTask] = []
        self.used: dict[int, set[str]] = {i: set() for i in range(len(self.models))}
        self.missing: dict[int, list[str]] = {}
        self.exclude_patterns = list(cfg.exclude or [])
        self.out_tied = self._tied(out_idx)

        if cfg.models:
            self._plan_models_form(slices[0])
            out_layers = None
        else:
            out_layers = self._plan_slices_form(slices)

        self._account()
        if not self.tasks:
            raise CheckpointError(f"{self.src}: the merge produces no tensors")
        out_config = self._out_config(out_idx, out_layers, slices)
        aux = self._aux_source(base, slices)
        return MergePlan(
            config=cfg,
            config_path=self.config_path,
            method=method,
            method_name=cfg.merge_method,
            models=self.models,
            base_index=base,
            tasks=self.tasks,
            excluded=self.excluded,
            out_config=out_config,
            aux_source=aux,
            seed=self.seed,
            notes=self.notes,
        )

    # -- helpers -----------------------------------------------------------------------------------
    def _check_architectures(self, slices: list[_Slice], base: Optional[int]) -> None:
        """Participants must share the architecture (config.json), before any tensor is compared."""
        used = sorted({s.model for sl in slices for s in sl.sources} | ({base} if base is not None else set()))
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

    def _tied(self, idx: int) -> bool:
        m = self.models[idx]
        cfg = m.config or {}
        v = cfg.get("tie_word_embeddings")
        if v is None and isinstance(cfg.get("text_config"), dict):
            v = cfg["text_config"].get("tie_word_embeddings")
        if isinstance(v, bool):
            return v
        return TIED_HEAD not in m.ckpt

    def _is_excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude_patterns)

    def _participants(self, sl: _Slice) -> tuple[Optional[int], list[_Source]]:
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
        if n < method.min_models:
            what = "non-base models" if base is not None else "models"
            raise ConfigError(
                f"{self.src}: {sl.where}: merge method {self.method_name!r} needs at least {method.min_models} "
                f"{what}, got {n}"
            )
        if method.max_models is not None and n > method.max_models:
            what = "non-base models" if base is not None else "models"
            raise ConfigError(
                f"{self.src}: {sl.where}: merge method {self.method_name!r} takes at most {method.max_models} "
                f"{what}, got {n}"
            )
        return base, others

    def _add_task(
        self,
        out_name: str,
        sl: _Slice,
        base: Optional[int],
        others: list[_Source],
        in_names: dict[int, str],
        t: float,
        layer_index: Optional[int],
    ) -> None:
        """Plan one output tensor from the same-named (or renumbered) tensors of the participants."""
        from adaptkit.io.dtypes import ITEMSIZE

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
        is_float = all(d in FLOAT_CODES for d in dtypes)
        any_float = any(d in FLOAT_CODES for d in dtypes)
        if any_float and not is_float:
            raise CheckpointError(
                f"tensor {ref.name!r} mixes floating-point and non-float dtypes across models "
                f"({', '.join(f'{self.label(m)}: {infos[m].dtype}' for m in models)})"
            )
        for mi in models:
            self.used[mi].add(in_names[mi])
        in_bytes = sum(infos[m].nbytes for m in models)
        if not is_float:
            if len(dtypes) > 1:
                raise CheckpointError(
                    f"non-float tensor {ref.name!r} has different dtypes across models "
                    f"({', '.join(f'{self.label(m)}: {infos[m].dtype}' for m in models)})"
                )
            self.tasks.append(
                TensorTask(out_name, ref.dtype, tuple(ref.shape), [(m, in_names[m]) for m in models], None, [], {},
                           layer_index, kind="identical", in_bytes=in_bytes)
            )
            return
        out_dtype = self.cfg.out_dtype_code or infos[models[0]].dtype
        per_model: list[dict[str, Any]] = []
        gscopes = [sl.params, self.cfg.parameters]
        for s in others:
            where = f"{self.src}: model {self.label(s.model)!r}"
            pm: dict[str, Any] = {}
            for p in self.method.params:
                if p.scope in ("model", "both"):
                    pm[p.name] = _resolve(p, [s.params, sl.params, self.cfg.parameters], in_names[s.model], t, where)
            per_model.append(pm)
        gp: dict[str, Any] = {}
        for p in self.method.params:
            if p.scope == "global":
                gp[p.name] = _resolve(p, gscopes, out_name, t, f"{self.src}")
            elif p.scope == "both":
                try:
                    gp[p.name] = _resolve(p, gscopes, out_name, t, f"{self.src}")
                except ConfigError:
                    pass
        kind = "merge"
        if (self.method_name in ("passthrough",) and len(models) == 1
                and all(v == 1.0 for v in (per_model[0] if per_model else {}).values())):
            kind = "copy"
        self.tasks.append(
            TensorTask(
                out_name=out_name,
                dtype=out_dtype,
                shape=tuple(ref.shape),
                inputs=[(s.model, in_names[s.model]) for s in others],
                base=(base, in_names[base]) if base is not None else None,
                params=per_model,
                global_params=gp,
                layer_index=layer_index,
                kind=kind,
                in_bytes=in_bytes,
                compute_float64="F64" in dtypes,
            )
        )

    def _shape_message(self, name: str, m0: int, i0: Any, m1: int, i1: Any) -> str:
        a, b = self.label(m0), self.label(m1)
        if _PRE_RE.search(name) or name.endswith(TIED_HEAD):
            if len(i0.shape) == 2 and len(i1.shape) == 2 and i0.shape[1] == i1.shape[1]:
                return (
                    f"tensor {name!r}: vocabulary sizes differ ({i0.shape[0]} in {a!r} vs {i1.shape[0]} in {b!r}); "
                    "adaptkit merges only models with the same vocabulary (vocabulary alignment is not supported)"
                )
        return f"tensor {name!r}: shape {list(i0.shape)} in {a!r} vs {list(i1.shape)} in {b!r}"

    def _names(self, mi: int) -> list[str]:
        return self.models[mi].ckpt.names()

    def _drop_tied_head(self, mi: int, names: list[str]) -> list[str]:
        """Apply the tied-embedding rule: with a tied output, an input's stored ``lm_head.weight`` is left
        out when that input ties too; an untied input with its own head is an error."""
        if TIED_HEAD not in names:
            return names
        if self.out_tied:
            if self._tied(mi):
                self.excluded.append((self.label(mi), TIED_HEAD, "tied to the input embedding (tie_word_embeddings)"))
                return [n for n in names if n != TIED_HEAD]
            raise CheckpointError(
                f"model {self.label(mi)!r} has its own {TIED_HEAD!r} (tie_word_embeddings is false) but the output "
                "ties the embeddings (from the base/first model); merge models with the same tying, or add "
                f"'{TIED_HEAD}' to 'exclude'"
            )
        return names

    def _check_untied_has_head(self, models: list[int]) -> None:
        if self.out_tied:
            return
        for mi in models:
            if TIED_HEAD not in self.models[mi].ckpt and self._tied(mi) and any(
                TIED_HEAD in self.models[o].ckpt for o in models
            ):
                raise CheckpointError(
                    f"model {self.label(mi)!r} ties its embeddings (no {TIED_HEAD!r}) but the output has a "
                    "separate lm_head (from the base/first model); merge models with the same tying"
                )

    def _selected(self, mi: int) -> list[str]:
        names = []
        for n in self._names(mi):
            if self._is_excluded(n):
                continue
            names.append(n)
        return self._drop_tied_head(mi, names)

    def _plan_models_form(self, sl: _Slice) -> None:
        base, others = self._participants(sl)
        models = ([base] if base is not None else []) + [s.model for s in others]
        self._check_untied_has_head(models)
        # layer counts must agree per stack
        stacks = self.models[models[0]].stacks
        for mi in models[1:]:
            if self.models[mi].stacks != stacks:
                a, b = self.label(models[0]), self.label(mi)
                raise CheckpointError(
                    f"models {a!r} and {b!r} have different layer counts "
                    f"({stacks or 'none'} vs {self.models[mi].stacks or 'none'}); use 'slices' for frankenmerges"
                )
        # output tensor names: union over participants, in the first participant's order
        order: list[str] = []
        seen: set[str] = set()
        for mi in models:
            for n in self._selected(mi):
                if n not in seen:
                    seen.add(n)
                    order.append(n)
        for name in order:
            sp = split_layer(name)
            if sp:
                n_layers = stacks.get(sp[0], 1)
                t = sp[1] / (n_layers - 1) if n_layers > 1 else 1.0
                li: Optional[int] = sp[1]
            else:
                t, li = 0.0, None
            self._add_task(name, sl, base, others, {m: name for m in models}, t, li)

    def _plan_slices_form(self, slices: list[_Slice]) -> int:
        # a single layer stack is required
        prefixes: set[str] = set()
        for sl in slices:
            for s in sl.sources:
                prefixes.update(self.models[s.model].stacks)
        if len(prefixes) != 1:
            raise ConfigError(
                f"{self.src}: 'slices' needs models with exactly one stack of numbered layers "
                f"(found: {', '.join(sorted(prefixes)) or 'none'})"
            )
        prefix = next(iter(prefixes))
        for si, sl in enumerate(slices):
            lengths = []
            for s in sl.sources:
                a, b = s.layer_range or (0, 0)
                n = self.models[s.model].stacks.get(prefix, 0)
                if b > n:
                    raise ConfigError(
                        f"{self.src}: {sl.where}: layer_range [{a}, {b}] is beyond model {self.label(s.model)!r}, "
                        f"which has {n} layers"
                    )
                lengths.append(b - a)
            if len(set(lengths)) != 1:
                raise ConfigError(
                    f"{self.src}: {sl.where}: all sources of a slice must span the same number of layers "
                    f"(got {lengths})"
                )
        # index the selected tensors of each model: layer -> {rest: name}, and non-layer names
        layer_names: dict[int, dict[int, dict[str, str]]] = {}
        nonlayer: dict[int, list[str]] = {}
        for mi in range(len(self.models)):
            per: dict[int, dict[str, str]] = {}
            nl: list[str] = []
            for n in self._selected(mi):
                sp = split_layer(n)
                if sp and sp[0] == prefix:
                    per.setdefault(sp[1], {})[sp[2]] = n
                else:
                    nl.append(n)
            layer_names[mi] = per
            nonlayer[mi] = nl

        def plan_nonlayer(sl: _Slice, names_pred: Any) -> None:
            base, others = self._participants(sl)
            models = ([base] if base is not None else []) + [s.model for s in others]
            self._check_untied_has_head(models)
            order: list[str] = []
            seen: set[str] = set()
            for mi in models:
                for n in nonlayer[mi]:
                    if names_pred(n) and n not in seen:
                        seen.add(n)
                        order.append(n)
            for name in order:
                self._add_task(name, sl, base, others, {m: name for m in models}, 0.0, None)

        plan_nonlayer(slices[0], lambda n: bool(_PRE_RE.search(n)))
        out_layer = 0
        for sl in slices:
            base, others = self._participants(sl)
            srcs = ([next(s for s in sl.sources if s.model == base)] if base is not None else []) + others
            a0 = srcs[0].layer_range or (0, 0)
            n = a0[1] - a0[0]
            for off in range(n):
                t = off / (n - 1) if n > 1 else 1.0
                rests: list[str] = []
                seen_r: set[str] = set()
                for s in srcs:
                    li = (s.layer_range or (0, 0))[0] + off
                    for r in layer_names[s.model].get(li, {}):
                        if r not in seen_r:
                            seen_r.add(r)
                            rests.append(r)
                for r in rests:
                    in_names = {}
                    for s in srcs:
                        li = (s.layer_range or (0, 0))[0] + off
                        in_names[s.model] = layer_names[s.model].get(li, {}).get(r, f"{prefix}.{li}.{r}")
                    self._add_task(f"{prefix}.{out_layer}.{r}", sl, base, others, in_names, t, out_layer)
                out_layer += 1
        plan_nonlayer(slices[-1], lambda n: not _PRE_RE.search(n))
        return out_layer

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
        for mi, entry in enumerate(self.models):
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

    def _out_config(self, out_idx: int, out_layers: Optional[int], slices: list[_Slice]) -> dict[str, Any] | None:
        src = self.models[out_idx].config
        if src is None:
            return None
        cfg = json.loads(json.dumps(src))
        target = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) and "num_hidden_layers" not in cfg else cfg
        if out_layers is not None:
            for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
                if key in target:
                    target[key] = out_layers
                    break
            else:
                target["num_hidden_layers"] = out_layers
            # per-layer lists (e.g. layer_types) follow the slices
            for key, val in list(target.items()):
                if isinstance(val, list) and out_layers and key in ("layer_types",):
                    new: list[Any] = []
                    ok = True
                    for sl in slices:
                        s0 = sl.sources[0]
                        scfg = self.models[s0.model].config or {}
                        sval = scfg.get(key)
                        a, b = s0.layer_range or (0, 0)
                        if not isinstance(sval, list) or len(sval) < b:
                            ok = False
                            break
                        new.extend(sval[a:b])
                    if ok:
                        target[key] = new
        # dtype
        codes = {t.dtype for t in self.tasks if t.kind != "identical"}
        from adaptkit.config import SAFETENSORS_TO_TORCH_NAME

        if len(codes) == 1:
            name = SAFETENSORS_TO_TORCH_NAME.get(next(iter(codes)))
            if name:
                keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
                for k in keys:
                    cfg[k] = name
        # vocab
        for t in self.tasks:
            if _PRE_RE.search(t.out_name) and "embed" in t.out_name and len(t.shape) == 2:
                if "vocab_size" in target:
                    target["vocab_size"] = t.shape[0]
                break
        if self.out_tied is not None and "tie_word_embeddings" in target:
            target["tie_word_embeddings"] = self.out_tied
        return cfg

    def _aux_source(self, base: Optional[int], slices: list[_Slice]) -> Optional[Path]:
        ts = self.cfg.tokenizer_source
        default = self.models[base if base is not None else slices[0].sources[0].model].path
        if ts is None or ts == "base":
            if ts == "base" and base is None:
                raise ConfigError(f"{self.src}: tokenizer_source: base needs a base_model")
            return default
        if ts == "union":
            # a union of identical tokenizers is that tokenizer; anything else needs vocabulary alignment
            used = sorted({s.model for sl in slices for s in sl.sources} | ({base} if base is not None else set()))
            blobs = {}
            for mi in used:
                p = self.models[mi].path
                tok = p / "tokenizer.json" if p.is_dir() else None
                blobs[mi] = tok.read_bytes() if tok is not None and tok.exists() else None
            if len(set(blobs.values())) > 1:
                raise ConfigError(
                    f"{self.src}: tokenizer_source: union of different tokenizers is not supported "
                    "(adaptkit does not align vocabularies); use 'base' or a model"
                )
            return default
        if ts in self._by_ref:
            return self.models[self._by_ref[ts]].path
        path = resolve_model_path(ts, self.base_dir, self.src)  # a tokenizer-only folder is fine
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise ConfigError(f"{self.src}: tokenizer_source {ts!r} has no tokenizer files (tokenizer.json)")
        return path


def build_plan(
    cfg: MergeConfig,
    config_path: Path | str | None,
    registry: MergerRegistry,
    *,
    seed: int = 0,
    allow_pickle: bool = False,
) -> MergePlan:
    """Plan a merge (headers only). Raises ConfigError / CheckpointError with one-line messages."""
    planner = _Planner(
        cfg, Path(config_path) if config_path is not None else None, registry, seed=seed, allow_pickle=allow_pickle
    )
    try:
        return planner.plan()
    except BaseException:
        for m in planner.models:
            try:
                m.ckpt.close()
            except Exception:  # noqa: BLE001
                pass
        raise
