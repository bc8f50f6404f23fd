"""Layer stacks, slices and layer ranges: which input tensors make which output tensor.

A tensor name like ``model.layers.3.mlp.up_proj.weight`` belongs to layer 3 of the stack ``model.layers``.
The *models form* of a config (``models:``) merges same-named tensors; the *slices form* (``slices:``) builds
output layers from a ``layer_range`` of each source and renumbers them. Both are expressed here as a list of
:class:`TensorGroup` (output name, the input name per model, gradient position ``t``, output layer index);
the planner (:mod:`adaptkit.merge.plan`) turns each group into a task. Nothing here opens a file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from adaptkit.errors import ConfigError

_LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<idx>\d+)\.(?P<rest>.+)$")
#: names of tensors that come before the layer stack (embeddings): in the slices form they are taken from the
#: first slice; every other non-layer tensor (final norm, lm_head) from the last one
_PRE_RE = re.compile(r"(embed|wte|wpe|word_embeddings)")


def split_layer(name: str) -> tuple[str, int, str] | None:
    """``"model.layers.3.mlp.up_proj.weight"`` -> ``("model.layers", 3, "mlp.up_proj.weight")``."""
    m = _LAYER_RE.match(name)
    if not m:
        return None
    return m.group("prefix"), int(m.group("idx")), m.group("rest")


def is_pre_layer(name: str) -> bool:
    """Whether ``name`` is an embedding-like tensor (before the layer stack)."""
    return bool(_PRE_RE.search(name))


def stacks_of(names: list[str]) -> dict[str, int]:
    """Layer-stack prefix -> number of layers (highest index + 1) among ``names``."""
    out: dict[str, int] = {}
    for n in names:
        sp = split_layer(n)
        if sp:
            out[sp[0]] = max(out.get(sp[0], 0), sp[1] + 1)
    return out


def layer_position(index: int, n_layers: int) -> float:
    """The gradient position of layer ``index`` of ``n_layers``: ``index / (n - 1)`` (1.0 for a single layer)."""
    return index / (n_layers - 1) if n_layers > 1 else 1.0


@dataclass
class Source:
    """One model's part in a slice (the whole model in the models form)."""

    model: int
    params: dict[str, Any] | None
    layer_range: Optional[tuple[int, int]] = None


@dataclass
class Slice:
    sources: list[Source]
    base: Optional[int]
    params: dict[str, Any] | None
    where: str  #: config location, for messages ("models", "slices[2]")


@dataclass
class TensorGroup:
    """One output tensor: its name, the input tensor name of each participating model, the gradient position
    ``t`` in [0, 1] and the output layer index (None outside the layer stack)."""

    out_name: str
    in_names: dict[int, str]
    t: float
    layer_index: Optional[int]


def models_form_groups(models: list[int], selected: Callable[[int], list[str]],
                       stacks: dict[str, int]) -> list[TensorGroup]:
    """Same-named tensors of ``models``: the union of their selected names, in the first model's order."""
    order: list[str] = []
    seen: set[str] = set()
    for mi in models:
        for n in selected(mi):
            if n not in seen:
                seen.add(n)
                order.append(n)
    groups = []
    for name in order:
        sp = split_layer(name)
        if sp:
            t, li = layer_position(sp[1], stacks.get(sp[0], 1)), sp[1]
        else:
            t, li = 0.0, None
        groups.append(TensorGroup(name, {m: name for m in models}, t, li))
    return groups


def single_stack(slices: list[Slice], stacks: Callable[[int], dict[str, int]], src: str) -> str:
    """The one layer-stack prefix the slices form needs (a ConfigError otherwise)."""
    prefixes: set[str] = set()
    for sl in slices:
        for s in sl.sources:
            prefixes.update(stacks(s.model))
    if len(prefixes) != 1:
        raise ConfigError(
            f"{src}: 'slices' needs models with exactly one stack of numbered layers "
            f"(found: {', '.join(sorted(prefixes)) or 'none'})"
        )
    return next(iter(prefixes))


def check_layer_ranges(slices: list[Slice], prefix: str, stacks: Callable[[int], dict[str, int]],
                       label: Callable[[int], str], src: str) -> None:
    """Every ``layer_range`` lies inside its model, and the sources of a slice span equally many layers."""
    for sl in slices:
        lengths = []
        for s in sl.sources:
            a, b = s.layer_range or (0, 0)
            n = stacks(s.model).get(prefix, 0)
            if b > n:
                raise ConfigError(
                    f"{src}: {sl.where}: layer_range [{a}, {b}] is beyond model {label(s.model)!r}, "
                    f"which has {n} layers"
                )
            lengths.append(b - a)
        if len(set(lengths)) != 1:
            raise ConfigError(
                f"{src}: {sl.where}: all sources of a slice must span the same number of layers (got {lengths})"
            )


def index_layers(names: list[str], prefix: str) -> tuple[dict[int, dict[str, str]], list[str]]:
    """``names`` split into ``{layer: {rest: name}}`` for the stack ``prefix`` and the other names."""
    per: dict[int, dict[str, str]] = {}
    other: list[str] = []
    for n in names:
        sp = split_layer(n)
        if sp and sp[0] == prefix:
            per.setdefault(sp[1], {})[sp[2]] = n
        else:
            other.append(n)
    return per, other


def slice_layer_groups(srcs: list[Source], prefix: str, layer_names: dict[int, dict[int, dict[str, str]]],
                       first_out_layer: int) -> tuple[list[TensorGroup], int]:
    """The output layers of one slice (``srcs``: base source first, if any), renumbered from
    ``first_out_layer``; returns the groups and the number of layers. A tensor one source lacks keeps its
    expected name (the planner reports it as missing)."""
    a0 = srcs[0].layer_range or (0, 0)
    n = a0[1] - a0[0]
    groups = []
    for off in range(n):
        t = layer_position(off, n)
        out_layer = first_out_layer + off
        rests: list[str] = []
        seen: set[str] = set()
        for s in srcs:
            li = (s.layer_range or (0, 0))[0] + off
            for r in layer_names[s.model].get(li, {}):
                if r not in seen:
                    seen.add(r)
                    rests.append(r)
        for r in rests:
            in_names = {}
            for s in srcs:
                li = (s.layer_range or (0, 0))[0] + off
                in_names[s.model] = layer_names[s.model].get(li, {}).get(r, f"{prefix}.{li}.{r}")
            groups.append(TensorGroup(f"{prefix}.{out_layer}.{r}", in_names, t, out_layer))
    return groups, n


def nonlayer_groups(models: list[int], nonlayer: dict[int, list[str]], keep: Callable[[str], bool]) -> list[TensorGroup]:
    """Same-named non-layer tensors of ``models`` accepted by ``keep`` (``t = 0``, no layer index)."""
    order: list[str] = []
    seen: set[str] = set()
    for mi in models:
        for n in nonlayer[mi]:
            if keep(n) and n not in seen:
                seen.add(n)
                order.append(n)
    return [TensorGroup(name, {m: name for m in models}, 0.0, None) for name in order]
