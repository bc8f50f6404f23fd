"""``adaptkit run PIPELINE.yml [--from STEP] [--json]``: run a pipeline of named steps (train, merge-adapter,
merge, quantize, eval, verify) that refer to each other's outputs by name. The file is validated whole (schema,
references, cycles, every step's plugin and settings) before anything runs; finished steps are found by their
content-addressed output folder and skipped. Thin: the work is in :mod:`adaptkit.pipeline` (specs/pipeline.md);
this module imports click only."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("run")
@click.argument("pipeline", metavar="PIPELINE.yml", type=click.Path(path_type=Path))
@click.option("--from", "from_step", default=None, metavar="STEP",
              help="Rerun STEP and every step after it that reads its output, even when finished.")
@click.option("--output", "-o", "output", type=click.Path(path_type=Path), default=None,
              help="Folder of the step outputs (default: the pipeline's 'output', else PIPELINE.out beside it).")
@click.option("--dry-run", is_flag=True, help="Validate and print the plan (which steps would run); run nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON summary on stdout (nothing else).")
def run(pipeline: Path, from_step: str | None, output: Path | None, dry_run: bool, quiet: bool, as_json: bool) -> None:
    """Run the steps of PIPELINE.yml in order, skipping those whose output is already there.

    Each step's output goes to OUTPUT/<step>-<key>, where the key hashes the step's settings and inputs: a
    rerun skips finished steps, and a run stopped by an error or Ctrl-C resumes at the step that did not finish.
    """
    from adaptkit.cli import get_host
    from adaptkit.pipeline.runner import run_pipeline, summary_table
    from adaptkit.pipeline.schema import load_pipeline

    pipe = load_pipeline(pipeline, output=output)
    host = get_host()
    try:
        doc = run_pipeline(pipe, host, from_step=from_step, show_progress=not quiet and not as_json,
                           log=None if quiet else (lambda m: click.echo(m, err=True)), dry_run=dry_run)
    except Exception:
        # a step failed: the table of what ran, what failed and what did not run (stderr), then the error line
        if not quiet and not dry_run:
            _failed_table(pipe.output)
        raise
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
        return
    ran = sum(r["status"] == "ran" for r in doc["steps"])
    cached = sum(r["status"] == "cached" for r in doc["steps"])
    click.echo(summary_table(doc))
    if dry_run:
        click.echo(f"dry run: {len(doc['steps']) - cached} step(s) to run, {cached} finished earlier; outputs in "
                   f"{doc['output']}")
    else:
        click.echo(f"pipeline {pipeline.name}: {ran} step(s) ran, {cached} finished earlier, in {doc['seconds']:.1f}s; "
                   f"outputs in {doc['output']} (state: {doc['output']}/pipeline.json)")


def _failed_table(output: Path) -> None:
    from adaptkit.pipeline.runner import STATE_FILE, summary_table

    try:
        doc = json.loads((output / STATE_FILE).read_text(encoding="utf-8"))
        click.echo(summary_table(doc), err=True)
    except (OSError, ValueError, KeyError, TypeError):
        pass
