"""``adaptkit eval MODEL [--suite NAME | --tasks ...] [--baseline BASE] [--json]``: run registered evaluators
through the evaluate runner, print a table (metric, task, model, baseline, delta) and write the report folder
(``eval.json``, ``eval.md`` model-card section, ``eval.png`` chart of deltas when there is a baseline, and
per-sample details). Thin: planning and running live in :mod:`adaptkit.verify.evaluation`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from adaptkit.errors import CheckpointError, ConfigError


def _options(pairs: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``-o EVALUATOR.KEY=VALUE`` -> {evaluator: {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        ev, dot, name = key.strip().partition(".")
        if not sep or not dot or not ev or not name:
            raise ConfigError(f"--option {pair!r}: expected EVALUATOR.KEY=VALUE (e.g. perplexity.max_length=1024)")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        out.setdefault(ev, {})[name.replace("-", "_")] = value
    return out


def _list_tasks(host: Any, as_json: bool) -> None:
    from adaptkit.verify import evaluation

    cat = evaluation.catalog(host)
    doc = {ev: [{"task": s.name, "suites": list(s.options.get("suites", ())), "kind": s.options.get("kind"),
                 "attribution": s.options.get("attribution", "")} for s in specs] for ev, specs in cat.items()}
    if as_json:
        click.echo(json.dumps({"evaluators": doc, "suites": evaluation.suites(cat)}, indent=2))
        return
    for ev, tasks in doc.items():
        click.echo(f"{ev}:")
        for t in tasks:
            click.echo(f"  {t['task']:<14} suites: {', '.join(t['suites']) or '-':<22} {t['attribution']}")
    click.echo(f"suites: {', '.join(evaluation.suites(cat))}")


@click.command("eval")
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--suite", default=None, metavar="NAME", help="A task suite (quick, standard, lmeval; default quick).")
@click.option("--tasks", "tasks", multiple=True, metavar="TASK[,TASK...]",
              help="Tasks instead of a suite: TASK (its default evaluator), EVALUATOR:TASK, EVALUATOR:FILE or "
                   "EVALUATOR. Comma-separated or repeated.")
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="Also evaluate BASE and report deltas (agreement needs it, and the same tokenizer).")
@click.option("--limit", type=int, default=None, help="Evaluate at most N samples per task.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Rows per forward pass (at most).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--option", "-o", "options", multiple=True, metavar="EVALUATOR.KEY=VALUE",
              help="An evaluator option (see `adaptkit plugins --json`), e.g. -o perplexity.max_length=1024.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Report folder (default ./adaptkit-reports/<model name>/).")
@click.option("--list-tasks", is_flag=True, help="List the evaluators' tasks and suites, and exit.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout (nothing else).")
def eval_cmd(model: Path | None, suite: str | None, tasks: tuple[str, ...], baseline: Path | None, limit: int | None,
             batch_size: int, device: str, seed: int, options: tuple[str, ...], out: Path | None, list_tasks: bool,
             no_progress: bool, as_json: bool) -> None:
    """Evaluate MODEL (any checkpoint a loader reads) with the registered evaluators.

    Examples: `adaptkit eval out/merged --baseline base`, `adaptkit eval m --tasks flores_eng,analogy_mc`,
    `adaptkit eval m --tasks perplexity:my_text.txt --json`.
    """
    import time

    from adaptkit import __version__
    from adaptkit.cli import get_host
    from adaptkit.verify import evaluation, report

    host = get_host()
    if list_tasks:
        _list_tasks(host, as_json)
        return
    if model is None:
        raise click.UsageError("missing argument MODEL")
    if suite and tasks:
        raise ConfigError("--suite and --tasks are exclusive: give one")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    for label, p in (("model", model), ("baseline", baseline)):
        if p is not None and not p.exists():
            raise CheckpointError(f"{p}: no such file or folder (the {label}; adaptkit reads local checkpoints only)")
    names = [t for arg in tasks for t in arg.split(",") if t.strip()]
    planned, notes = evaluation.plan(host, tasks=names or None, suite=suite, baseline=baseline is not None)
    if not planned:
        raise ConfigError("nothing to evaluate: " + "; ".join(notes))
    opts = _options(options)
    for ev in opts:
        evaluation.evaluator_component(host, ev)  # an unknown evaluator in -o is an error
    out_dir = out if out is not None else report.default_out(model)
    t0 = time.perf_counter()
    bar = evaluation.progress_bar("eval", enabled=not no_progress)
    with bar:
        results = evaluation.run_planned(host, planned, model=model, baseline=baseline, limit=limit, device=device,
                                         batch_size=batch_size, seed=seed, output=out_dir / "details",
                                         relay=evaluation.ProgressRelay(bar), options=opts)
    rows = evaluation.metric_rows(results)
    doc: dict[str, Any] = {
        "schema": 1, "command": "eval", "adaptkit_version": __version__, "model": str(model),
        "baseline": str(baseline) if baseline else None, "limit": limit, "metrics": rows,
        "results": {k: v.to_json() for k, v in results.items()}, "notes": notes,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    chart_path, chart_note = report.chart(rows, out_dir / "eval.png", title=f"{model.name} vs {baseline.name}"
                                          if baseline else model.name)
    if chart_note and baseline is not None:
        notes.append(chart_note)
    doc["chart"] = chart_path
    doc["files"] = {"json": str(out_dir / "eval.json"), "card": str(out_dir / "eval.md"), "chart": chart_path}
    report.write_text(out_dir / "eval.md", report.eval_card(doc))
    report.write_json(out_dir / "eval.json", doc)
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
        return
    click.echo(f"eval {model}" + (f" against {baseline}" if baseline else ""))
    click.echo(report.text_table(rows))
    for n in notes:
        click.echo(f"note: {n}")
    click.echo(f"report: {doc['files']['json']}" + (f", chart: {chart_path}" if chart_path else "")
               + f", card: {doc['files']['card']}")
