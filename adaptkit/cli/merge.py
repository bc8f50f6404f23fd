"""``adaptkit merge CONFIG.yml OUT``: merge checkpoints from a (mergekit-compatible) YAML recipe."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import click


def _size(value: str) -> int:
    from adaptkit.errors import ConfigError
    from adaptkit.io import parse_size

    try:
        n = parse_size(value)
    except (ValueError, ConfigError) as exc:
        raise ConfigError(f"--max-shard-size: {exc}") from None
    if n <= 0:
        raise ConfigError(f"--max-shard-size must be positive, got {value!r}")
    return n


@click.command("merge")
@click.argument("config_file", metavar="CONFIG.yml", type=click.Path(path_type=Path))
@click.argument("out", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--device", default="cpu", show_default=True, help="Compute device: cpu or cuda.")
@click.option("--threads", type=int, default=None,
              help="Torch compute threads, 1 to the number of cores (default: all cores). The output does not depend on it.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of randomized methods (DARE/DELLA masks are seeded per tensor and model).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard (e.g. 500MB, 2GiB).")
@click.option("--dry-run", is_flag=True, help="Validate and print the plan; reads headers only, writes nothing.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("--allow-pickle", is_flag=True,
              help="Read legacy pickle weights (.bin/.pt) with torch.load(weights_only=True). Off by default.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
@click.option("--strict", is_flag=True,
              help="Make warnings errors (a parameter the merge method ignores, e.g. a per-model weight for slerp).")
@click.option("--intermediate-dir", type=click.Path(path_type=Path), default=None,
              help="Multi-stage configs: keep each named stage's output in DIR/<name> "
              "(default: a temporary folder beside OUT, removed afterwards).")
def merge(config_file: Path, out: Path, device: str, threads: Optional[int], seed: int, max_shard_size: str,
          dry_run: bool, force: bool, as_json: bool, allow_pickle: bool, quiet: bool, strict: bool,
          intermediate_dir: Optional[Path]) -> None:
    """Merge the models of CONFIG.yml (mergekit's YAML schema) into the folder OUT.

    Every tensor of every input is merged, passed through, or excluded by an explicit config rule;
    math is done in fp32 and rounded once; OUT appears atomically (nothing is left there on error).
    A file of several YAML documents is a multi-stage merge (mergekit-multi): named stages run in order,
    later ones naming earlier ones as models; the last document is written to OUT.
    """
    from adaptkit.merge.runtime import tune_allocator, tune_openmp
    from adaptkit.threads import check_threads

    check_threads(threads)  # before anything is read: one line, nothing written
    tune_openmp()  # before torch is imported
    tune_allocator()  # before torch is imported
    from adaptkit.cli import get_host
    from adaptkit.io import check_output_target, format_size
    from adaptkit.merge.plan import build_plan
    from adaptkit.merge.stages import load_stages

    shard = _size(max_shard_size)
    host = get_host()
    stages = load_stages(config_file)
    check_output_target(out, force)
    if len(stages) > 1:
        _merge_stages(stages, config_file, out, host, dict(
            device=device, threads=threads, seed=seed, shard=shard, dry_run=dry_run, force=force, as_json=as_json,
            allow_pickle=allow_pickle, quiet=quiet, strict=strict, intermediate_dir=intermediate_dir))
        return
    cfg = stages[0].config
    t0 = time.perf_counter()
    plan = build_plan(cfg, config_file, host.mergers, host=host, seed=seed, allow_pickle=allow_pickle,
                      strict=strict)
    try:
        for w in plan.warnings:
            click.echo(f"warning: {w}", err=True)
        summary = plan.summary(device)
        if dry_run:
            summary.update({"dry_run": True, "output": str(out), "plan_seconds": round(time.perf_counter() - t0, 3)})
            if as_json:
                click.echo(json.dumps(summary, indent=2))
            else:
                _print_plan(summary, out, format_size)
            return

        from adaptkit.merge.engine import run_merge_step
        from adaptkit.progress import Progress

        bar = Progress(len(plan.tasks), "merging", unit="tensors", enabled=not quiet)

        def progress(done: int, total: int, done_bytes: int, total_bytes: int) -> None:
            bar.update(done, status=f"{format_size(done_bytes)} / {format_size(total_bytes)} written")

        with bar:
            result = run_merge_step(host, plan, out, info={"config": str(config_file)}, device=device,
                                    threads=threads, max_shard_size=shard, force=force, progress=progress)
        doc = result.as_dict()
        doc["excluded_reasons"] = summary["excluded_reasons"]
        if as_json:
            click.echo(json.dumps(doc, indent=2))
        else:
            stats = ", ".join(f"{k}={v}" for k, v in doc["stats"].items())
            click.echo(
                f"merged {doc['tensors']} tensors ({format_size(doc['bytes_written'])}) with {doc['method']} "
                f"into {out} in {doc['seconds']:.1f}s" + (f"; {stats}" if stats else "")
            )
    finally:
        plan.close()


def _print_plan(summary: dict, out: Path, format_size: Callable[[int], str]) -> None:
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(summary["tensor_kinds"].items()))
    click.echo(f"plan: {summary['method']} of {len(summary['models'])} models -> {out}")
    for m in summary["models"]:
        how = m["loader"]
        if m["dequantized"]:
            how += f", dequantized from {m['source_format']}"
        click.echo(f"  model {m['ref']!r}{' (base)' if m['base'] else ''}: {m['path']} [{how}]")
    click.echo(f"  tensors: {summary['tensors']} ({kinds}); excluded by config: {summary['excluded']}")
    for reason, n in sorted(summary["excluded_reasons"].items()):
        click.echo(f"    {n} excluded: {reason}")
    click.echo(f"  read: {format_size(summary['bytes_read'])}, write: {format_size(summary['bytes_written'])}")
    click.echo(f"  estimated peak memory: {format_size(summary['peak_memory_estimate'])}")
    if summary["num_hidden_layers"] is not None:
        click.echo(f"  output layers: {summary['num_hidden_layers']}")
    for note in summary["notes"]:
        click.echo(f"  note: {note}")


def _merge_stages(stages: list, config_file: Path, out: Path, host, o: dict) -> None:
    """A multi-stage config: each stage planned and merged in order (``adaptkit.merge.stages``)."""
    from adaptkit.io import format_size
    from adaptkit.merge.engine import run_merge_step
    from adaptkit.merge.plan import build_plan
    from adaptkit.merge.stages import check_references, references, run_stages

    check_references(stages, config_file.parent)
    names = {st.name for st in stages if st.name}
    if o["dry_run"]:
        docs = []
        for st in stages:
            deps = sorted({r for _, r in references(st.config) if r in names})
            if deps:
                docs.append({"stage": st.name, "final": st is stages[-1], "after": deps})
                if not o["as_json"]:
                    click.echo(f"{st.label}: merges the output of {', '.join(repr(d) for d in deps)} "
                               "(planned once that has run)")
                continue
            plan = build_plan(st.config, config_file, host.mergers, host=host, seed=o["seed"],
                              allow_pickle=o["allow_pickle"], strict=o["strict"])
            try:
                summary = plan.summary(o["device"])
            finally:
                plan.close()
            docs.append({"stage": st.name, "final": st is stages[-1], **summary})
            if not o["as_json"]:
                click.echo(f"{st.label}:")
                _print_plan(summary, out if st is stages[-1] else Path(st.name), format_size)
        if o["as_json"]:
            click.echo(json.dumps({"dry_run": True, "output": str(out), "stages": docs}, indent=2))
        return

    def run_one(cfg, target: Path, st, final: bool):
        plan = build_plan(cfg, config_file, host.mergers, host=host, seed=o["seed"], allow_pickle=o["allow_pickle"],
                          strict=o["strict"])
        try:
            for w in plan.warnings:
                click.echo(f"warning: {w}", err=True)
            result = run_merge_step(host, plan, target, info={"config": str(config_file), "stage": st.name},
                                    device=o["device"], threads=o["threads"], max_shard_size=o["shard"],
                                    force=o["force"] or not final and o["intermediate_dir"] is None)
        finally:
            plan.close()
        if not o["quiet"] and not final:
            click.echo(f"{st.label}: merged {result.tensors} tensors into {target}", err=True)
        return result

    result = run_stages(stages, config_file, out, run_one, intermediate_dir=o["intermediate_dir"], force=o["force"])
    doc = result.as_dict()
    doc["stages"] = [st.name for st in stages]
    if o["as_json"]:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(f"merged {doc['tensors']} tensors ({format_size(doc['bytes_written'])}) with {doc['method']} "
                   f"into {out} in {doc['seconds']:.1f}s ({len(stages)} stages)")
