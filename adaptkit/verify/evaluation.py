"""Planning and running evaluations for ``adaptkit eval`` and the gates of ``adaptkit verify``: which
evaluator runs which task, one progress bar, tokenizer compatibility, and the metric rows of the reports.

Tasks are discovered from the evaluators themselves: an evaluator implementation may carry ``tasks()``
returning the :class:`~adaptkit.evaluate.api.TaskSpec` s it offers; ``TaskSpec.options`` may hold
``suites`` (names of suites the task belongs to under that evaluator) and ``default_evaluator`` (the
evaluator a bare task name means). Task arguments:

* ``EVALUATOR:TASK`` -- that evaluator on that task (a shipped task name or a path to a data file);
* ``TASK``           -- the task's default evaluator;
* ``EVALUATOR``      -- the evaluator on its own default tasks.
"""
from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptkit.errors import ConfigError, PluginError
from adaptkit.evaluate.api import EvalRequest, EvalResult, TaskSpec

INSTALL_HINT = "install the evaluators: pip install -e plugins/adaptkit-eval (or pip install adaptkit-eval)"


@dataclass
class PlannedEval:
    evaluator: str
    tasks: tuple[TaskSpec, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


def evaluator_component(host: Any, name: str) -> Any:
    try:
        return host.evaluators.get(name)
    except ConfigError:
        if not list(host.evaluators.entries()):
            raise ConfigError(f"no evaluator {name!r}: no evaluators are installed ({INSTALL_HINT})") from None
        raise


def evaluator_tasks(host: Any, name: str) -> tuple[TaskSpec, ...]:
    """The tasks an evaluator offers (``impl.tasks()``; empty when it does not say)."""
    ev = evaluator_component(host, name)
    impl = ev.load()
    lister = getattr(impl, "tasks", None)
    return tuple(lister()) if callable(lister) else ()


def catalog(host: Any) -> dict[str, tuple[TaskSpec, ...]]:
    """Every registered evaluator (short name) and its tasks."""
    out: dict[str, tuple[TaskSpec, ...]] = {}
    for entry in host.evaluators.entries():
        name = entry.component.name
        if name in out:
            continue
        try:
            out[name] = evaluator_tasks(host, name)
        except (ConfigError, PluginError):  # ambiguous short name: reachable through its qualified name
            out[name] = ()
    return out


def suites(cat: dict[str, tuple[TaskSpec, ...]]) -> list[str]:
    return sorted({s for specs in cat.values() for spec in specs for s in spec.options.get("suites", ())})


def _known_tasks(cat: dict[str, tuple[TaskSpec, ...]]) -> list[str]:
    return sorted({spec.name for specs in cat.values() for spec in specs})


def _task_of(cat: dict[str, tuple[TaskSpec, ...]], evaluator: str, task: str) -> TaskSpec:
    for spec in cat.get(evaluator, ()):
        if spec.name == task:
            return spec
    p = Path(task).expanduser()
    if p.suffix and (p.exists() or "/" in task):
        return TaskSpec(p.stem, p)  # the evaluator validates the file
    offered = [s.name for s in cat.get(evaluator, ())]
    close = difflib.get_close_matches(task, offered, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown task {task!r} for evaluator {evaluator!r}{hint} "
                      f"(its tasks: {', '.join(offered) or 'none'}; or a path to a data file)")


def plan(host: Any, *, tasks: list[str] | None, suite: str | None, baseline: bool
         ) -> tuple[list[PlannedEval], list[str]]:
    """(evaluations to run in order, notes about what was skipped)."""
    cat = catalog(host)
    if not cat:
        raise ConfigError(f"no evaluators are installed ({INSTALL_HINT})")
    notes: list[str] = []
    chosen: dict[str, list[TaskSpec]] = {}
    own_defaults: set[str] = set()

    def add(ev: str, spec: TaskSpec | None) -> None:
        lst = chosen.setdefault(ev, [])
        if spec is None:
            own_defaults.add(ev)
        elif all(s.name != spec.name for s in lst):
            lst.append(spec)

    if tasks:
        for arg in tasks:
            arg = arg.strip()
            if not arg:
                continue
            if arg in cat or arg in host.evaluators:
                add(evaluator_component(host, arg).name, None)
                continue
            left, sep, right = arg.rpartition(":")
            if sep and (left in cat or left in host.evaluators):
                ev = evaluator_component(host, left).name
                add(ev, _task_of(cat, ev, right))
                continue
            owners = [ev for ev, specs in cat.items() for s in specs if s.name == arg]
            if not owners:
                known = _known_tasks(cat)
                close = difflib.get_close_matches(arg, known + list(cat), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"unknown task {arg!r}{hint} (tasks: {', '.join(known)}; evaluators: "
                                  f"{', '.join(cat)}; or EVALUATOR:FILE for a data file)")
            default = next((s.options.get("default_evaluator") for ev in owners for s in cat[ev]
                            if s.name == arg and s.options.get("default_evaluator") in owners), owners[0])
            add(default, _task_of(cat, default, arg))
    else:
        name = suite or "quick"
        known = suites(cat)
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown suite {name!r}{hint} (suites: {', '.join(known) or 'none'})")
        for ev, specs in cat.items():
            for spec in specs:
                if name in spec.options.get("suites", ()):
                    add(ev, spec)
    out: list[PlannedEval] = []
    for ev, specs in chosen.items():
        comp = evaluator_component(host, ev)
        if comp.needs_baseline and not baseline:
            if tasks:
                raise ConfigError(f"evaluator {ev!r} compares against a baseline: give one (--baseline)")
            notes.append(f"{ev} skipped: it compares against a baseline (--baseline)")
            continue
        out.append(PlannedEval(ev, () if ev in own_defaults and not specs else tuple(specs)))
    return out, notes


class ProgressRelay:
    """Feeds every evaluator's ``report(done, total)`` into the command's one progress bar."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.label = ""

    def stage(self, label: str) -> None:
        self.label = label
        if self.bar is not None:
            self.bar.update(0, total=0, status=label)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(done, total=total, status=self.label)


def check_tokenizers(host: Any, model: Path, baseline: Path) -> tuple[bool, str]:
    from adaptkit.verify.tokenizer_check import compare_tokenizers

    return compare_tokenizers(model, baseline, host=host)


def run_planned(host: Any, planned: list[PlannedEval], *, model: Path, baseline: Path | None, limit: int | None,
                device: str, batch_size: int, seed: int, output: Path | None, relay: ProgressRelay | None,
                options: dict[str, dict[str, Any]] | None = None,
                same_tokenizer: tuple[bool, str] | None = None) -> dict[str, EvalResult]:
    """Run each planned evaluation through :func:`adaptkit.evaluate.runner.run_eval`. An evaluator that
    declares ``same_tokenizer`` with a baseline of another tokenizer is a ConfigError saying why."""
    from adaptkit.evaluate.runner import run_eval

    results: dict[str, EvalResult] = {}
    for item in planned:
        comp = evaluator_component(host, item.evaluator)
        if comp.same_tokenizer and baseline is not None:
            same, why = same_tokenizer if same_tokenizer is not None else check_tokenizers(host, model, baseline)
            if not same:
                raise ConfigError(f"baseline {baseline} has a different tokenizer than {model} ({why}): evaluator "
                                  f"{item.evaluator!r} compares token distributions and needs the same tokenizer; "
                                  "byte-level metrics (bits_per_byte, accuracy) do not")
        if relay is not None:
            relay.stage(f"{item.evaluator}" + (f" {','.join(t.name for t in item.tasks)}" if item.tasks else ""))
        req = EvalRequest(model=model, evaluator=comp.name, tasks=item.tasks, baseline=baseline,
                          options={**(options or {}).get(comp.name, {}), **item.options}, device=device,
                          batch_size=batch_size, limit=limit, seed=seed,
                          output=(output / comp.name) if output is not None else None,
                          progress=relay)
        t0 = time.perf_counter()
        res = run_eval(req, host=host)
        res.details.setdefault("wall_seconds", round(time.perf_counter() - t0, 3))
        results[comp.name] = res
    return results


def metric_rows(results: dict[str, EvalResult]) -> list[dict[str, Any]]:
    rows = []
    for ev, res in results.items():
        for m in res.metrics:
            rows.append({"evaluator": ev, "task": m.task, "metric": m.name, "value": m.value, "baseline": m.baseline,
                         "delta": m.delta, "higher_is_better": m.higher_is_better, "improved": m.improved,
                         "stderr": m.stderr, "n": m.n})
    return rows


def progress_bar(desc: str, enabled: bool = True) -> Any:
    from adaptkit.progress import Progress

    return Progress(0, desc, enabled=enabled)

