"""What each step kind checks before the run (``prepare``) and calls during it (``run``).

Every kind calls its own runner, the one its command calls (``run_train``, ``merge_into_weights``,
``build_plan`` + ``run_merge_step``, ``run_quantize``, ``run_planned``, ``verify``), with its component taken
from the plugin host's registries by name -- so a third party's trainer, merger, quantizer or evaluator is
usable in a pipeline as soon as its distribution is installed. Nothing is re-implemented here.

``prepare`` runs for every step before any step runs: it resolves the component (a name no installed plugin
registers is a one-line error naming the plugin to install), validates the settings with the kind's own
validators, and returns what the cache key is made of. Nothing here imports torch at import time.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from adaptkit.errors import ConfigError

__all__ = ["Prepared", "Context", "prepare", "PROVIDERS"]

#: (registry kind, component name) -> (distribution, install command) for components shipped with adaptkit's
#: repository; a step's ``plugin:`` key names the distribution of any other one.
PROVIDERS: dict[tuple[str, str], tuple[str, str]] = {
    **{("trainer", n): ("adaptkit-trl", "pip install -e plugins/adaptkit-trl")
       for n in ("sft", "dpo", "kto", "orpo", "simpo", "grpo", "reward")},
    **{("quantizer", n): ("adaptkit-quant", "pip install -e plugins/adaptkit-quant")
       for n in ("rtn", "nf4", "gptq", "awq")},
    **{("evaluator", n): ("adaptkit-eval", "pip install -e plugins/adaptkit-eval")
       for n in ("perplexity", "lmeval", "agreement", "probes")},
    ("merger", "median"): ("adaptkit-example-merge", "pip install -e examples/adaptkit-example-merge"),
    ("quantizer", "int8-absmax"): ("adaptkit-example-quant", "pip install -e examples/adaptkit-example-quant"),
}


@dataclass
class Prepared:
    """A step ready to run: what its key is made of, and the call that writes its output folder."""

    settings: Any
    files: dict[str, str]
    component: Any
    run: Callable[[Path, Any], dict[str, Any]]  #: run(out, progress) -> JSON summary of the step
    label: str = ""  #: method / component shown in the table


@dataclass
class Context:
    host: Any
    pipe: Any
    paths: dict[str, Path] = field(default_factory=dict)  #: input or step name -> its folder

    def path(self, name: str) -> Path:
        return self.paths[name]

    def where(self, step: Any) -> str:
        return f"{self.pipe.source}: step {step.name!r}"

    def component(self, what: str, registry: Any, name: str, step: Any) -> Any:
        """The registry entry called ``name``; a name no installed plugin registers says which to install."""
        try:
            return registry.entry(name)
        except ConfigError as exc:
            if ":" in name or name in registry._entries:
                raise ConfigError(f"{self.where(step)}: {exc.message}") from None
            dist, how = PROVIDERS.get((what, name), (None, None))
            if step.plugin:
                dist, how = step.plugin, f"pip install {step.plugin}"
            known = ", ".join(registry.names()) or "none"
            if dist is not None:
                raise ConfigError(f"{self.where(step)}: {what} {name!r} is not installed: it comes from the plugin "
                                  f"{dist} ({how}; `adaptkit plugins` then lists it); installed {what}s: {known}"
                                  ) from None
            raise ConfigError(f"{self.where(step)}: {what} {name!r} is not installed: no installed plugin registers "
                              f"it (install the distribution that provides it, or name it with 'plugin:' in the "
                              f"step; `adaptkit plugins` lists what is installed); installed {what}s: {known}"
                              ) from None


def _identity(entry: Any) -> dict[str, str]:
    return {"name": entry.qualified_name, "version": entry.owner.version}


def _resolve_file(value: str, root: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else root / p


def _bar(desc: str, unit: str, enabled: bool) -> Any:
    from adaptkit.progress import Progress

    return Progress(0, desc, unit=unit, enabled=enabled)


# -- train ------------------------------------------------------------------------------------------------


def _train(step: Any, ctx: Context) -> Prepared:
    from adaptkit.pipeline.keys import file_sha256
    from adaptkit.train.recipe import apply_overrides, load_recipe, parse_recipe, recipe_to_request
    from adaptkit.train.runner import check_request

    b = step.body
    where = ctx.where(step)
    pairs = [f"base={json.dumps(str(ctx.path(b.base)))}"] + [f"{k}={json.dumps(v)}" for k, v in b.set.items()]
    files: dict[str, str] = {}
    if isinstance(b.recipe, str):
        rpath = _resolve_file(b.recipe, ctx.pipe.root)
        try:
            rec, raw = load_recipe(rpath, pairs)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc.message}") from None
        root, source = rpath.parent, rpath.name
        files["recipe"] = file_sha256(rpath)
    else:
        raw = apply_overrides(b.recipe, pairs, src=f"{where}: train.set")
        root, source = ctx.pipe.root, f"{where}: train.recipe"
        rec = parse_recipe(raw, source=source)
    try:
        request = recipe_to_request(rec, root=root, source=source, raw=raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
    if "device" in step.raw:
        import dataclasses

        request = dataclasses.replace(request, device=step.device)
    entry = ctx.component("trainer", ctx.host.trainers, request.method, step)
    try:
        check_request(entry.component, request, ctx.host)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
    settings = request.describe()
    settings.pop("model", None)
    for part in ("train_data", "eval_data"):
        spec = getattr(request, part)
        if spec is not None:
            files[part] = file_sha256(Path(spec.path))
            if isinstance(settings.get(part), dict):
                settings[part].pop("path", None)
    host = ctx.host

    def run(out: Path, show: bool) -> dict[str, Any]:
        from adaptkit.train.runner import checkpoint_dir_for, latest_checkpoint, run_train

        bar = None

        def progress(done: int, total: int, metrics: dict[str, float]) -> None:
            nonlocal bar
            if not show:
                return
            if bar is None:
                from adaptkit.progress import Progress

                bar = Progress(total, f"{step.name}: {request.method} ({request.adapter.kind})", unit="steps")
                bar.__enter__()
            status = f"loss {metrics['loss']:.4g}" if "loss" in metrics else None
            bar.update(done, total=total, status=status)

        resume = latest_checkpoint(checkpoint_dir_for(out)) is not None  # an interrupted run left checkpoints
        try:
            result = run_train(request, out, host=host, progress=progress, resume=resume)
        finally:
            if bar is not None:
                bar.close()
        return {"steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 3),
                "resumed": resume, "metrics": result.metrics}

    return Prepared(settings=settings, files=files, component=_identity(entry), run=run, label=request.method)


# -- merge-adapter ----------------------------------------------------------------------------------------


def _merge_adapter(step: Any, ctx: Context) -> Prepared:
    b = step.body
    where = ctx.where(step)
    if b.weights is not None and len(b.weights) != len(b.adapters):
        raise ConfigError(f"{where}: merge-adapter.weights: {len(b.weights)} weight(s) for {len(b.adapters)} "
                          "adapter(s); give one per adapter")
    host = ctx.host
    base = ctx.path(b.base)
    adapters = [ctx.path(a) for a in b.adapters]

    def run(out: Path, show: bool) -> dict[str, Any]:
        from adaptkit.adapters import tune_blas, tune_openmp

        tune_openmp()
        tune_blas()
        from adaptkit.adapters.merge import merge_into_weights

        policy = None
        if b.base_quantization == "none":
            from adaptkit.adapters import qlora

            policy = qlora.BaseQuantization(source=f"pipeline step {step.name}: base_quantization none")

        def _run() -> Any:
            return merge_into_weights(host, base, adapters, out, weights=b.weights,
                                      dtype=None if b.dtype == "auto" else b.dtype, device=step.device,
                                      base_quantization=policy, progress=show)

        doc = host.run_step("merge-adapter", "into-weights", _run, base=str(base),
                            adapters=[str(a) for a in adapters], output=str(out))
        return {k: doc.get(k) for k in ("changed_tensors", "tensors", "seconds")}

    return Prepared(settings=b.model_dump(mode="json"), files={}, component="merge-adapter", run=run,
                    label="into-weights")


# -- merge ------------------------------------------------------------------------------------------------


def _merge(step: Any, ctx: Context) -> Prepared:
    from adaptkit.config import parse_merge_config
    from adaptkit.pipeline.graph import split_ref

    where = ctx.where(step)
    resolved = copy.deepcopy(step.body)

    def res(value: str) -> str:
        return "+".join(str(ctx.path(p)) for p in split_ref(value))

    if isinstance(resolved.get("base_model"), str):
        resolved["base_model"] = res(resolved["base_model"])
    for m in resolved.get("models") or []:
        if isinstance(m, dict) and isinstance(m.get("model"), str):
            m["model"] = res(m["model"])
    for sl in resolved.get("slices") or []:
        for src in (sl.get("sources") or []) if isinstance(sl, dict) else []:
            if isinstance(src, dict) and isinstance(src.get("model"), str):
                src["model"] = res(src["model"])
    tok = resolved.get("tokenizer_source")
    if isinstance(tok, str) and tok not in ("base", "union"):
        resolved["tokenizer_source"] = res(tok)
    cfg = parse_merge_config(resolved, source=f"{where}: merge")
    host = ctx.host
    entry = ctx.component("merger", host.mergers, cfg.merge_method, step)
    from adaptkit.merge.params import validate_config_parameters

    known = frozenset(p.name for e in host.mergers.entries() for p in e.component.params)
    validate_config_parameters(entry.component, cfg, f"{where}: merge", known_elsewhere=known, warnings=[])
    pipe_path = ctx.pipe.path

    def run(out: Path, show: bool) -> dict[str, Any]:
        from adaptkit.merge.runtime import tune_allocator, tune_openmp

        tune_openmp()
        tune_allocator()
        from adaptkit.io import format_size
        from adaptkit.merge.engine import run_merge_step
        from adaptkit.merge.plan import build_plan
        from adaptkit.progress import Progress

        plan = build_plan(cfg, pipe_path, host.mergers, host=host, seed=step.seed)
        try:
            bar = Progress(len(plan.tasks), f"{step.name}: merging", unit="tensors", enabled=show)

            def progress(done: int, total: int, done_bytes: int, total_bytes: int) -> None:
                bar.update(done, status=f"{format_size(done_bytes)} / {format_size(total_bytes)} written")

            with bar:
                result = run_merge_step(host, plan, out, info={"pipeline": str(pipe_path), "step": step.name},
                                        device=step.device, progress=progress)
        finally:
            plan.close()
        doc = result.as_dict()
        return {k: doc.get(k) for k in ("method", "tensors", "bytes_written", "seconds", "stats")}

    return Prepared(settings={"config": step.body, "seed": step.seed, "device": step.device}, files={},
                    component=_identity(entry), run=run, label=cfg.merge_method)


# -- quantize ---------------------------------------------------------------------------------------------

_COMMON = ("bits", "group_size", "sym", "act_order", "damp", "partial_groups")
_DEFAULTS = {"sym": True, "act_order": False, "damp": 0.01, "partial_groups": False}


def _quantize(step: Any, ctx: Context) -> Prepared:
    from adaptkit.pipeline.keys import file_sha256

    b = step.body
    where = ctx.where(step)
    host = ctx.host
    entry = ctx.component("quantizer", host.quantizers, b.method, step)
    comp = entry.component
    try:
        opts = comp.resolve_options(dict(b.options), where=f"{where}: quantize.options")
    except ConfigError as exc:
        raise ConfigError(exc.message if exc.message.startswith(where) else f"{where}: {exc.message}") from None
    explicit = [f for f in _COMMON if getattr(b, f) is not None]
    unaccepted = [f for f in explicit if f not in comp.accepts]
    if unaccepted:
        raise ConfigError(f"{where}: quantize.{unaccepted[0]}: quantizer {comp.name!r} does not use it "
                          f"(it accepts: {', '.join(comp.accepts) or 'none'})")
    if b.bits is not None and b.bits not in comp.bits:
        raise ConfigError(f"{where}: quantize.bits: quantizer {comp.name!r} produces {', '.join(map(str, comp.bits))}"
                          f" bits, not {b.bits}")
    files: dict[str, str] = {}
    calib = b.calib
    if not calib.startswith("builtin"):
        cp = _resolve_file(calib, ctx.pipe.root)
        if not cp.is_file():
            raise ConfigError(f"{where}: quantize.calib: {cp}: no such file (a .jsonl file or builtin[-news|-wiki|-pydoc])")
        files["calib"] = file_sha256(cp)
        calib = str(cp)
    model = ctx.path(b.model)
    values = {f: getattr(b, f) if getattr(b, f) is not None else _DEFAULTS.get(f) for f in _COMMON}

    def run(out: Path, show: bool) -> dict[str, Any]:
        from adaptkit.quantize.runner import run_quantize

        def _run() -> Any:
            return run_quantize(model, out, quantizer=comp, explicit=explicit, calib=calib, nsamples=b.nsamples,
                                seqlen=b.seqlen, device=step.device, seed=step.seed, requantize=b.requantize,
                                options=opts, host=host, entry=entry, show_progress=show, **values)

        result = host.run_step("quantize", comp.name, _run, model=str(model), output=str(out),
                               format=comp.formats[0])
        doc = result.to_json()
        return {k: doc.get(k) for k in ("method", "format", "quantized_modules", "bytes_in", "bytes_out", "seconds")}

    settings = {**b.model_dump(mode="json"), "calib": b.calib, "options": opts, "seed": step.seed,
                "device": step.device}
    return Prepared(settings=settings, files=files, component=_identity(entry), run=run, label=comp.name)


# -- eval -------------------------------------------------------------------------------------------------


def _evaluator(ctx: Context, step: Any, name: str) -> Any:
    return ctx.component("evaluator", ctx.host.evaluators, name, step)


def _eval(step: Any, ctx: Context) -> Prepared:
    from adaptkit.pipeline.keys import file_sha256
    from adaptkit.verify import evaluation

    b = step.body
    where = ctx.where(step)
    host = ctx.host
    if b.suite and b.tasks:
        raise ConfigError(f"{where}: eval: give tasks or suite, not both")
    files: dict[str, str] = {}
    names: list[str] = []
    for t in b.tasks or []:
        ev, sep, rest = t.partition(":")
        if sep:
            _evaluator(ctx, step, ev)
            p = _resolve_file(rest, ctx.pipe.root)
            if rest and p.is_file():
                files[t] = file_sha256(p)
                t = f"{ev}:{p}"
        names.append(t)
    for ev in b.options:
        _evaluator(ctx, step, ev)
    try:
        planned, notes = evaluation.plan(host, tasks=names or None, suite=b.suite, baseline=b.baseline is not None)
    except ConfigError as exc:
        raise ConfigError(f"{where}: eval: {exc.message}") from None
    if not planned:
        raise ConfigError(f"{where}: eval: nothing to evaluate: " + "; ".join(notes))
    comps = {p.evaluator: _identity(_evaluator(ctx, step, p.evaluator)) for p in planned}
    model = ctx.path(b.model)
    baseline = ctx.path(b.baseline) if b.baseline else None

    def run(out: Path, show: bool) -> dict[str, Any]:
        from adaptkit.io.atomic import atomic_output_dir
        from adaptkit.verify import report

        with atomic_output_dir(out) as tmp:
            bar = evaluation.progress_bar(f"{step.name}: eval", enabled=show)
            with bar:
                results = evaluation.run_planned(host, planned, model=model, baseline=baseline, limit=b.limit,
                                                 device=step.device, batch_size=b.batch_size, seed=step.seed,
                                                 output=Path(tmp) / "details",
                                                 relay=evaluation.ProgressRelay(bar), options=b.options)
            rows = evaluation.metric_rows(results)
            doc = {"schema": 1, "command": "eval", "model": str(model), "baseline": str(baseline) if baseline else None,
                   "limit": b.limit, "metrics": rows, "results": {k: v.to_json() for k, v in results.items()},
                   "notes": notes}
            report.write_json(Path(tmp) / "eval.json", doc)
            report.write_text(Path(tmp) / "eval.md", report.eval_card(doc))
        return {"metrics": rows}

    settings = {**b.model_dump(mode="json"), "tasks": b.tasks, "seed": step.seed, "device": step.device}
    return Prepared(settings=settings, files=files, component=comps, run=run, label=",".join(comps))


# -- verify -----------------------------------------------------------------------------------------------


def _verify(step: Any, ctx: Context) -> Prepared:
    from adaptkit.pipeline.keys import file_sha256
    from adaptkit.verify.gates import load_gates

    b = step.body
    where = ctx.where(step)
    host = ctx.host
    files: dict[str, str] = {}
    gates_file = None
    if b.gates is not None:
        gates_file = _resolve_file(b.gates, ctx.pipe.root)
        try:
            load_gates(gates_file)
        except ConfigError as exc:
            raise ConfigError(f"{where}: verify.gates: {exc.message}") from None
        files["gates"] = file_sha256(gates_file)
    if not host.evaluators.names():
        raise ConfigError(f"{where}: verify needs the evaluators, and none is installed: it comes from the plugin "
                          "adaptkit-eval (pip install -e plugins/adaptkit-eval)")
    model = ctx.path(b.model)
    baseline = ctx.path(b.baseline) if b.baseline else None

    def run(out: Path, show: bool) -> dict[str, Any]:
        from adaptkit.errors import CheckpointError, QualityGateError
        from adaptkit.io.atomic import atomic_output_dir
        from adaptkit.verify.run import verify

        with atomic_output_dir(out) as tmp:
            doc = host.run_step("verify", "verify", lambda: verify(
                model, host=host, baseline=baseline, gates_file=gates_file, manifest=b.manifest, out=Path(tmp),
                device=step.device, batch_size=b.batch_size, limit=b.limit, scan_values=b.scan_values,
                progress=show), model=str(model), output=str(out))
            if doc["verdict"] == "broken":
                first = doc["errors"][0] if doc["errors"] else "see the checks"
                raise CheckpointError(f"{model}: broken: {first}")
            if doc["verdict"] == "gate-failed":
                g = [g for g in doc["gates"] if not g["passed"]][0]
                raise QualityGateError(f"{model}: gate {g['gate']} failed on {g['task']}: {g['detail']}")
        gates = [{k: g.get(k) for k in ("gate", "task", "passed", "detail")} for g in doc.get("gates", [])]
        return {"verdict": doc["verdict"], "gates": gates, "metrics": doc.get("metrics", [])}

    settings = {**b.model_dump(mode="json"), "seed": step.seed, "device": step.device}
    return Prepared(settings=settings, files=files, component="verify", run=run, label="verify")


PREPARE: dict[str, Callable[[Any, Context], Prepared]] = {
    "train": _train, "merge-adapter": _merge_adapter, "merge": _merge, "quantize": _quantize, "eval": _eval,
    "verify": _verify,
}


def prepare(step: Any, ctx: Context) -> Prepared:
    return PREPARE[step.kind](step, ctx)
