"""References between steps: which names a step reads, their order, and the errors (unknown name, a report
used as a model, a cycle), each one line naming the file and the step."""
from __future__ import annotations

from typing import Any, Iterator

from adaptkit.errors import ConfigError
from adaptkit.io.yamlfile import nearest_hint

__all__ = ["MODEL_KINDS", "step_refs", "check_graph", "order", "merge_ref_fields", "downstream"]

#: kinds whose output is a checkpoint (other steps may take it as a model); eval and verify write reports
MODEL_KINDS = ("train", "merge-adapter", "merge", "quantize")


def merge_ref_fields(body: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(location, value)`` of every model reference in a mergekit mapping: ``base_model``,
    ``models[i].model``, ``slices[i].sources[j].model`` and a ``tokenizer_source`` that is not base/union.
    A value ``A+B`` (mergekit's base+adapter) is two references."""
    if isinstance(body.get("base_model"), str):
        yield "base_model", body["base_model"]
    for i, m in enumerate(body.get("models") or []):
        if isinstance(m, dict) and "model" in m:
            yield f"models[{i}].model", m["model"]
    for i, sl in enumerate(body.get("slices") or []):
        for j, src in enumerate((sl or {}).get("sources") or [] if isinstance(sl, dict) else []):
            if isinstance(src, dict) and "model" in src:
                yield f"slices[{i}].sources[{j}].model", src["model"]
    tok = body.get("tokenizer_source")
    if isinstance(tok, str) and tok not in ("base", "union"):
        yield "tokenizer_source", tok


def split_ref(value: str) -> list[str]:
    return [p.strip() for p in value.split("+")]


def step_refs(step: Any) -> list[tuple[str, str, bool]]:
    """``(location, name, needs_a_model)`` for every reference of ``step`` (a :class:`StepDef`)."""
    b = step.body
    k = step.kind
    out: list[tuple[str, str, bool]] = []
    if k == "train":
        out.append(("train.base", b.base, True))
    elif k == "merge-adapter":
        out.append(("merge-adapter.base", b.base, True))
        out += [(f"merge-adapter.adapters[{i}]", a, True) for i, a in enumerate(b.adapters)]
    elif k == "merge":
        for loc, value in merge_ref_fields(b):
            if not isinstance(value, str):
                raise ConfigError(f"step {step.name!r}: merge.{loc}: a model is the name of an input or an earlier "
                                  "step (a string), e.g. 'base' or 'base+my-adapter'")
            out += [(f"merge.{loc}", part, True) for part in split_ref(value)]
    elif k in ("quantize", "eval", "verify"):
        out.append((f"{k}.model", b.model, True))
        if getattr(b, "baseline", None) is not None:
            out.append((f"{k}.baseline", b.baseline, True))
    return out


def check_graph(pipe: Any) -> None:
    """Every reference names an input or a step whose output is a model; no cycles. Fills ``step.refs``."""
    src = pipe.source
    by_name = {s.name: s for s in pipe.steps}
    known = [*pipe.inputs, *by_name]
    for s in pipe.steps:
        names: list[str] = []
        for loc, name, model in step_refs(s):
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{src}: step {s.name!r}: {loc}: expected the name of an input or a step")
            if name == s.name:
                raise ConfigError(f"{src}: step {s.name!r}: {loc} refers to the step itself")
            if name not in pipe.inputs and name not in by_name:
                raise ConfigError(f"{src}: step {s.name!r}: {loc}: unknown reference {name!r}"
                                  f"{_hint(name, known)} (a model is the name of an input or of a step)")
            dep = by_name.get(name)
            if dep is not None and model and dep.kind not in MODEL_KINDS:
                raise ConfigError(f"{src}: step {s.name!r}: {loc}: step {name!r} is a {dep.kind} step, which writes "
                                  "a report, not a model")
            if name not in names:
                names.append(name)
        s.refs = names
    order(pipe)  # raises on a cycle


def _hint(name: str, known: list[str]) -> str:
    h = nearest_hint(name, known)
    return h if h.startswith(";") else f" (known: {', '.join(known)})"


def order(pipe: Any) -> list[Any]:
    """Steps in run order: every step after the steps it reads, otherwise in file order. A cycle is a one-line
    error listing it (``a -> b -> a``)."""
    by_name = {s.name: s for s in pipe.steps}
    done: list[Any] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(s: Any, path: list[str]) -> None:
        st = state.get(s.name)
        if st == 2:
            return
        if st == 1:
            cyc = path[path.index(s.name):] + [s.name]
            raise ConfigError(f"{pipe.source}: the steps form a cycle: {' -> '.join(cyc)}")
        state[s.name] = 1
        for r in s.refs:
            if r in by_name:
                visit(by_name[r], path + [s.name])
        state[s.name] = 2
        done.append(s)

    for s in pipe.steps:
        visit(s, [])
    return done


def downstream(pipe: Any, name: str) -> set[str]:
    """``name`` and every step that reads it, directly or not."""
    out = {name}
    changed = True
    while changed:
        changed = False
        for s in pipe.steps:
            if s.name not in out and any(r in out for r in s.refs):
                out.add(s.name)
                changed = True
    return out
