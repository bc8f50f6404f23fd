"""``adaptkit verify MODEL [--baseline BASE] [--gates gates.yml] [--manifest write|check] [--json]``: is this
checkpoint sound, and no worse than its base where it matters? Static checks, a strict load check and gates;
exit 0 (pass), 7 (a gate failed), 4 (the checkpoint is broken), 3 (bad gates file/options). Thin: the flow
lives in :mod:`adaptkit.verify.run`; rules, schema and exit codes in specs/verify.md."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("verify")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="The base model the gates compare against (default gates apply when --gates is not given).")
@click.option("--gates", "gates_file", type=click.Path(path_type=Path), default=None,
              help="Gates file (YAML, schema in specs/verify.md).")
@click.option("--manifest", type=click.Choice(["write", "check"]), default=None,
              help="write: record the sha256 of every file once the checkpoint is sound; check: every file must "
                   "match adaptkit-manifest.json (default: check it when it exists).")
@click.option("--limit", type=int, default=None, help="Samples per gate task (overrides the gates file's limit).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Rows per forward pass (at most).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--no-scan", is_flag=True, help="Skip the NaN/Inf scan of the stored values.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Report folder (default ./adaptkit-reports/<model name>/): verify.json, verify.md, verify.png.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout (nothing else).")
def verify(model: Path, baseline: Path | None, gates_file: Path | None, manifest: str | None, limit: int | None,
           batch_size: int, device: str, no_scan: bool, out: Path | None, no_progress: bool, as_json: bool) -> None:
    """Verify MODEL: static checks (no model code runs), a strict load check, and gates against BASE.

    Exit codes: 0 every check and gate passed; 7 a gate failed; 4 the checkpoint is broken (or missing);
    3 a bad gates file, option, unknown task, or a baseline whose tokenizer cannot serve a token-level gate.
    """
    from adaptkit.cli import get_host
    from adaptkit.errors import CheckpointError, ConfigError, QualityGateError
    from adaptkit.verify.run import summary_lines, verify as run_verify

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    doc = run_verify(model, host=get_host(), baseline=baseline, gates_file=gates_file, manifest=manifest, out=out,
                     device=device, batch_size=batch_size, limit=limit, scan_values=not no_scan,
                     progress=not no_progress)
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
    else:
        for line in summary_lines(doc):
            click.echo(line)
    if doc["verdict"] == "broken":
        first = doc["errors"][0] if doc["errors"] else "see the report"
        more = f" (+{len(doc['errors']) - 1} more)" if len(doc["errors"]) > 1 else ""
        raise CheckpointError(f"{model}: broken: {first}{more}")
    if doc["verdict"] == "gate-failed":
        failed = [g for g in doc["gates"] if not g["passed"]]
        g = failed[0]
        more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
        raise QualityGateError(f"{model}: gate {g['gate']} failed on {g['task']}: {g['detail']}{more}")
