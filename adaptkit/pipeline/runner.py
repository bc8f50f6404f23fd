"""The run: check every step, then run those without a finished output, in order.

1. :func:`plan_pipeline` prepares every step (components resolved, settings validated, keys computed) before
   anything runs: a bad step anywhere is a one-line error and nothing is written.
2. :func:`run_pipeline` walks the steps in order. A step whose output folder ``OUTPUT/<step>-<key[:12]>``
   exists is finished (outputs are published atomically, so an existing folder is complete) and is skipped;
   the others run through their kind's runner, each as a ``Step`` through ``host.run_step``. ``from_step``
   reruns that step and every step reading it, even when finished.
3. A step that fails stops the run: earlier outputs stay, the failing step leaves nothing (its runner writes
   into a temporary folder beside the target), and the error says how to resume. The state of every step is
   recorded in ``OUTPUT/pipeline.json`` after each step; its ``finished`` record keeps the summary of every step
   any pipeline finished in that folder (pipelines may share an output folder, and so their finished steps).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from adaptkit.errors import AdaptkitError, ConfigError, PluginError

__all__ = ["PlannedStep", "plan_pipeline", "run_pipeline", "STATE_FILE"]

STATE_FILE = "pipeline.json"


@dataclass
class PlannedStep:
    step: Any
    prepared: Any
    key: str
    out: Path
    deps: dict[str, str]

    @property
    def name(self) -> str:
        return self.step.name

    def finished(self) -> bool:
        return self.out.is_dir()


def plan_pipeline(pipe: Any, host: Any) -> list[PlannedStep]:
    """Prepare every step in run order (see the module docstring); no step runs."""
    from adaptkit.pipeline.graph import order
    from adaptkit.pipeline.keys import fingerprint, step_key
    from adaptkit.pipeline.kinds import Context, prepare

    ctx = Context(host=host, pipe=pipe, paths=dict(pipe.inputs))
    keys = {name: fingerprint(p) for name, p in pipe.inputs.items()}
    planned: list[PlannedStep] = []
    for step in order(pipe):
        prep = prepare(step, ctx)
        deps = {r: keys[r] for r in step.refs}
        key = step_key(step.kind, prep.settings, deps, prep.files, prep.component)
        out = pipe.output / f"{step.name}-{key[:12]}"
        keys[step.name] = key
        ctx.paths[step.name] = out
        planned.append(PlannedStep(step=step, prepared=prep, key=key, out=out, deps=deps))
    return planned


def _read_state(output: Path) -> dict[str, Any]:
    """``{key: {name, kind, seconds, summary}}`` of every step any pipeline finished in ``output`` (the state
    file's ``finished`` record, which every run sharing the folder extends)."""
    try:
        doc = json.loads((output / STATE_FILE).read_text(encoding="utf-8"))
        out = {k: v for k, v in (doc.get("finished") or {}).items() if isinstance(v, dict)}
        for s in doc.get("steps", []):
            if isinstance(s, dict) and "key" in s and s.get("status") in ("ran", "cached") and s["key"] not in out:
                out[s["key"]] = {k: s.get(k) for k in ("name", "kind", "seconds", "summary")}
        return out
    except (OSError, ValueError, AttributeError):
        return {}


def _write_state(output: Path, doc: dict[str, Any]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / f".{STATE_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, output / STATE_FILE)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _resume_hint(pipe: Any, name: str) -> str:
    return (f"outputs of the finished steps are kept in {pipe.output}; fix the cause and rerun "
            f"`adaptkit run {pipe.path}` (finished steps are skipped) or `adaptkit run {pipe.path} --from {name}`")


def _step_failed(exc: BaseException, pipe: Any, ps: PlannedStep) -> AdaptkitError:
    head = f"step {ps.name!r} ({ps.step.kind}) failed: "
    if isinstance(exc, AdaptkitError):
        err = type(exc).__new__(type(exc))
        AdaptkitError.__init__(err, head + exc.one_line() + "; " + _resume_hint(pipe, ps.name))
        return err
    text = " ".join(str(exc).split())[:300]
    return PluginError(head + f"{type(exc).__name__}: {text}; " + _resume_hint(pipe, ps.name))


def run_pipeline(pipe: Any, host: Any, *, from_step: str | None = None, show_progress: bool = True,
                 log: Callable[[str], None] | None = _stderr, dry_run: bool = False) -> dict[str, Any]:
    """Run ``pipe`` (a validated :class:`~adaptkit.pipeline.schema.Pipeline`); return the JSON summary."""
    from adaptkit.pipeline.graph import downstream

    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    planned = plan_pipeline(pipe, host)
    forced: set[str] = set()
    if from_step is not None:
        pipe.step(from_step)  # ConfigError naming the known steps
        forced = downstream(pipe, from_step)
    previous = _read_state(pipe.output)
    rows: list[dict[str, Any]] = []
    for ps in planned:
        cached = ps.finished() and ps.name not in forced
        prev = previous.get(ps.key, {})
        rows.append({"name": ps.name, "kind": ps.step.kind, "component": ps.prepared.label, "key": ps.key,
                     "output": str(ps.out), "inputs": list(ps.step.refs),
                     "status": ("cached" if cached else "planned"),
                     "seconds": prev.get("seconds") if cached else None,
                     "summary": prev.get("summary", {}) if cached else {}})

    def state(status: str) -> dict[str, Any]:
        return {"schema": 1, "pipeline": str(pipe.path), "output": str(pipe.output), "status": status,
                "seconds": round(time.perf_counter() - t0, 3), "steps": rows, "finished": previous}

    if dry_run:
        return state("dry-run")
    n = len(planned)
    for i, (ps, row) in enumerate(zip(planned, rows), 1):
        head = f"[{i}/{n}] {ps.name} ({ps.step.kind}: {ps.prepared.label})"
        if row["status"] == "cached":
            say(f"{head}: finished earlier, skipped -> {ps.out}")
            continue
        say(f"{head} -> {ps.out}")
        aside = None
        if ps.out.exists():  # --from: the old output stays until the new one is complete
            aside = ps.out.with_name(f".{ps.out.name}.previous-{os.getpid()}")
            os.replace(ps.out, aside)
        row["status"] = "running"
        _write_state(pipe.output, state("running"))
        t1 = time.perf_counter()
        try:
            summary = ps.prepared.run(ps.out, show_progress)
        except BaseException as exc:
            row["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            row["seconds"] = round(time.perf_counter() - t1, 3)
            row["error"] = exc.one_line() if isinstance(exc, AdaptkitError) else f"{type(exc).__name__}: {exc}"
            if aside is not None and not ps.out.exists():
                os.replace(aside, ps.out)
            for later in rows[i:]:
                if later["status"] == "planned":
                    later["status"] = "not run"
            _write_state(pipe.output, state(row["status"]))
            if isinstance(exc, KeyboardInterrupt):
                say(f"interrupted in step {ps.name!r}: {_resume_hint(pipe, ps.name)}")
                raise
            raise _step_failed(exc, pipe, ps) from exc
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        row.update(status="ran", seconds=round(time.perf_counter() - t1, 3), summary=summary)
        previous[ps.key] = {"name": ps.name, "kind": ps.step.kind, "seconds": row["seconds"], "summary": summary}
        say(f"      done in {row['seconds']:.1f}s")
    doc = state("finished")
    _write_state(pipe.output, doc)
    return doc


def summary_table(doc: dict[str, Any]) -> str:
    """The final table (plain text): step, kind, component, status, seconds, result, output."""
    lines = []
    header = ("step", "kind", "component", "status", "time", "result")
    table = [header]
    for r in doc["steps"]:
        secs = "" if r.get("seconds") is None else f"{r['seconds']:.1f}s"
        table.append((r["name"], r["kind"], r.get("component") or "", r["status"], secs, _result(r)))
    widths = [max(len(str(row[c])) for row in table) for c in range(len(header))]
    for row in table:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _result(r: dict[str, Any]) -> str:
    s = r.get("summary") or {}
    k = r["kind"]
    if r.get("error"):
        return r["error"][:80]
    if k == "train" and s:
        loss = (s.get("metrics") or {}).get("train_loss")
        return f"{s.get('steps')} steps" + (f", loss {loss:.4g}" if isinstance(loss, (int, float)) else "")
    if k == "merge-adapter" and s:
        return f"{s.get('changed_tensors')}/{s.get('tensors')} tensors changed"
    if k == "merge" and s:
        return f"{s.get('tensors')} tensors"
    if k == "quantize" and s:
        b_in, b_out = s.get("bytes_in") or 0, s.get("bytes_out") or 0
        ratio = f", {b_in / b_out:.2f}x smaller" if b_in and b_out else ""
        return f"{s.get('format')}, {s.get('quantized_modules')} linears{ratio}"
    if k in ("eval", "verify") and s:
        parts = []
        if k == "verify":
            parts.append(str(s.get("verdict")))
        for m in (s.get("metrics") or [])[:4]:
            d = m.get("delta")
            parts.append(f"{m.get('task') or ''} {m.get('metric')}={_fmt(m.get('value'))}"
                         + (f" ({d:+.4g})" if isinstance(d, (int, float)) else ""))
        return "; ".join(p.strip() for p in parts)
    return ""
