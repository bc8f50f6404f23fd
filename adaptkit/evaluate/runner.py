"""The evaluate runner: the one path every evaluator follows (request -> checks -> Step -> evaluator).

``run_eval(request, host=...)`` is what ``adaptkit eval`` / ``adaptkit verify`` call. What it checks is
declared on the ``Evaluator`` component (``adaptkit.hookspecs.adaptkit_register_evaluators``).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from adaptkit.errors import AdaptkitError, ConfigError
from adaptkit.evaluate.api import EvalRequest, EvalResult


def run_eval(request: EvalRequest, *, host: Any) -> EvalResult:
    """Run one evaluator on ``request.model`` (and the baseline); metrics carry their baseline values."""
    ev = host.evaluators.get(request.evaluator)
    options = ev.resolve_options(request.options, where=f"evaluator {ev.name}")
    if ev.needs_baseline and request.baseline is None:
        raise ConfigError(f"evaluator {ev.name!r} compares against a baseline: give one (--baseline)")
    for path in (request.model, request.baseline):
        if path is not None:
            host.open_model(path).close()  # readable by a loader (one-line error otherwise)
    impl = ev.load()
    declared = dict(ev.metrics)

    def _one(model: Any, baseline: Any) -> EvalResult:
        req = dataclasses.replace(request, model=model, baseline=baseline, options=options, host=host)
        t0 = time.perf_counter()
        result = host.run_step("eval", ev.name, lambda: impl(req), model=str(model))
        if not isinstance(result, EvalResult):
            raise AdaptkitError(f"evaluator {ev.name!r} returned {type(result).__name__}, not an EvalResult")
        for m in result.metrics:
            if m.name not in declared:
                raise AdaptkitError(f"evaluator {ev.name!r} reported undeclared metric {m.name!r} "
                                    f"(declared: {', '.join(declared) or 'none'})")
        result.seconds = result.seconds or time.perf_counter() - t0
        return result

    if ev.needs_baseline or request.baseline is None:
        return _one(request.model, request.baseline)
    result = _one(request.model, None)
    base = _one(request.baseline, None)
    for m in result.metrics:
        try:
            m.baseline = base.metric(m.name, m.task).value
        except KeyError:
            pass
    result.details["baseline_seconds"] = round(base.seconds, 3)
    return result
