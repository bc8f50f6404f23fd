"""``adaptkit train RECIPE.yml [--output OUT] [--resume] [--json] [--nproc N]``: fine-tune a model from a recipe.

The recipe (``specs/train.md``) names the base, the datasets, the method (a trainer registered by a plugin:
``adaptkit-trl`` provides sft, dpo, kto, orpo, simpo, grpo, reward), the adapter and the settings. Everything
is checked before training starts; OUT appears only when training succeeded. ``--nproc N`` relaunches the
command under ``torch.distributed.run`` (the command also works under ``accelerate launch``/``torchrun``).
This module imports click only; torch is imported by the trainer.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from adaptkit.errors import ConfigError


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(nproc: int, argv: list[str]) -> int:
    """Run ``adaptkit train ...`` in ``nproc`` processes (torch.distributed.run); its exit code."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "adaptkit", "train", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


def _summary(out: str, request: Any, result: Any) -> dict[str, Any]:
    tps = result.tokens / result.seconds if result.seconds and result.tokens else None
    return {"output": str(out), "method": request.method, "adapter": request.adapter.kind,
            "steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 3),
            "tokens_per_second": round(tps, 1) if tps else None, "best_checkpoint": result.best_checkpoint,
            "metrics": result.metrics}


@click.command("train")
@click.argument("recipe", type=click.Path(path_type=str))
@click.option("--output", "-o", "output", default=None, metavar="OUT",
              help="Output folder (default: the recipe's 'output', relative to the recipe).")
@click.option("--resume", is_flag=True,
              help="Continue from the last checkpoint an interrupted run writing OUT left beside it.")
@click.option("--nproc", type=int, default=None, metavar="N",
              help="Processes (torch.distributed.run; gloo on CPU). Default: the recipe's training.nproc.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set training.max_steps=20 (YAML value). Repeatable.")
@click.option("--force", is_flag=True, help="Replace a non-empty OUT.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def train(recipe: str, output: str | None, resume: bool, nproc: int | None, overrides: tuple[str, ...],
          force: bool, quiet: bool, as_json: bool) -> None:
    """Fine-tune the base model a RECIPE.yml names (SFT, DPO, KTO, ORPO, SimPO, GRPO, reward model).

    Writes OUT atomically: the PEFT adapter (or full model), tokenizer, chat template, train_log.jsonl and
    adaptkit.json (base identity and sha256, base quantization, recipe, versions, final metrics).
    """
    from adaptkit.cli import get_host
    from adaptkit.train.recipe import load_recipe, recipe_to_request
    from adaptkit.train.runner import check_request, process_rank, run_train

    recipe_path = Path(recipe)
    rec, raw = load_recipe(recipe_path, overrides)
    root = recipe_path.resolve().parent
    request = recipe_to_request(rec, root=root, source=recipe_path.name, raw=raw)
    if output is None:
        if rec.output is None:
            raise ConfigError(f"{recipe_path.name}: no output folder: pass --output OUT or set 'output' in the recipe")
        out = str(Path(rec.output) if Path(rec.output).is_absolute() else root / rec.output)
    else:
        out = output
    n = nproc if nproc is not None else request.settings.nproc
    if n < 1:
        raise ConfigError(f"--nproc must be >= 1, got {n}")
    if n != request.settings.nproc:
        import dataclasses

        request = dataclasses.replace(request, settings=dataclasses.replace(request.settings, nproc=n))
    host = get_host()
    rank, world = process_rank()
    if n > 1 and world == 1:
        # check everything here, once, so a bad recipe is one line and not one per process
        from adaptkit.io.atomic import check_output_target

        trainer = host.trainers.get(request.method)
        check_request(trainer, request, host)
        host.open_model(request.model).close()
        check_output_target(out, force=force)
        # torchrun's parser matches abbreviations even after the script, so no '--nproc' for the workers
        argv = [str(recipe_path), "--output", out, *(f"--set={o}" for o in overrides), f"--set=training.nproc={n}"]
        argv += [flag for flag, on in (("--resume", resume), ("--force", force), ("--quiet", quiet),
                                       ("--json", as_json)) if on]
        code = _launch(n, argv)
        if code:
            raise click.exceptions.Exit(code)
        return

    bar = None

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        nonlocal bar
        if quiet or rank != 0:
            return
        if bar is None:
            from adaptkit.progress import Progress

            bar = Progress(total, f"{request.method} ({request.adapter.kind})", unit="steps")
            bar.__enter__()
        parts = []
        if "loss" in metrics:
            parts.append(f"loss {metrics['loss']:.4g}")
        if "eval_loss" in metrics:
            parts.append(f"eval_loss {metrics['eval_loss']:.4g}")
        if metrics.get("tokens_per_second"):
            parts.append(f"{metrics['tokens_per_second']:.0f} tok/s")
        bar.update(step, total=total, status="  ".join(parts) if parts else None)

    try:
        result = run_train(request, out, host=host, force=force, progress=progress, resume=resume)
    except BaseException as exc:
        if bar is not None:
            bar.__exit__(RuntimeError, None, None)
        if isinstance(exc, KeyboardInterrupt) and rank == 0:
            from adaptkit.train.runner import checkpoint_dir_for, latest_checkpoint

            kept = latest_checkpoint(checkpoint_dir_for(out))
            if kept is not None:
                click.echo(f"note: checkpoints kept in {kept.parent}: rerun with --resume to continue from "
                           f"{kept.name}, or delete that folder", err=True)
        raise
    if bar is not None:
        bar.close()
    if rank != 0:
        return
    doc = _summary(out, request, result)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        tps = f", {doc['tokens_per_second']:.0f} tokens/s" if doc["tokens_per_second"] else ""
        loss = result.metrics.get("train_loss")
        shown = f", train loss {loss:.4g}" if loss is not None else ""
        click.echo(f"{request.method} ({request.adapter.kind}): wrote {out} ({result.steps} steps{shown}{tps}) "
                   f"in {result.seconds:.1f}s")
