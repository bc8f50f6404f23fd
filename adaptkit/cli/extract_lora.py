"""``adaptkit extract-lora FINETUNED BASE OUT --rank R``: a PEFT LoRA adapter from the difference of two
checkpoints (truncated SVD per weight). The work is in :mod:`adaptkit.adapters.extract`; this module parses
options only (click at import time, torch inside the command)."""
from __future__ import annotations

import json
from typing import Any

import click


@click.command("extract-lora")
@click.argument("finetuned", metavar="FINETUNED")
@click.argument("base", metavar="BASE")
@click.argument("out", metavar="OUT")
@click.option("--rank", "-r", type=click.IntRange(min=1), required=True, help="LoRA rank (capped per module by its shape).")
@click.option("--exact", is_flag=True, help="Exact SVD (torch.linalg.svd) instead of the randomized one.")
@click.option("--oversample", type=click.IntRange(min=0), default=10, show_default=True,
              help="Randomized SVD: extra probe vectors beyond the rank.")
@click.option("--niter", type=click.IntRange(min=0), default=2, show_default=True,
              help="Randomized SVD: power iterations (more: closer to the exact SVD on slowly decaying spectra).")
@click.option("--min-energy", type=float, default=None,
              help="Per module, the smallest rank <= --rank keeping this share of ||dW||^2 (e.g. 0.99); "
                   "recorded in rank_pattern.")
@click.option("--other", default="save", show_default=True, type=click.Choice(["save", "skip"]),
              help="Changed tensors a LoRA cannot carry (norms, biases): save their modules in full "
                   "(modules_to_save) or leave them out (reported).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="dtype of the adapter's tensors.")
@click.option("--device", default="cpu", show_default=True, help="Compute device: cpu or cuda[:N].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD probes.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar on stderr.")
def extract_lora(finetuned: str, base: str, out: str, rank: int, exact: bool, oversample: int, niter: int,
                 min_energy: float | None, other: str, dtype: str, device: str, seed: int, force: bool,
                 as_json: bool, quiet: bool) -> None:
    """Extract a rank-R LoRA adapter (PEFT folder OUT) that turns BASE into FINETUNED.

    Each changed linear weight gets a LoRA from a truncated SVD of its delta (randomized by default, --exact for
    the full SVD); embeddings get an embedding LoRA; other changed tensors are saved in full (--other). Reports
    the rank and the kept energy of every module.
    """
    from adaptkit.adapters import tune_openmp

    tune_openmp()  # before torch is imported
    from adaptkit.adapters.extract import extract_lora as run
    from adaptkit.cli import get_host

    host = get_host()

    def _run() -> Any:
        return run(host, finetuned, base, out, rank=rank, exact=exact, oversample=oversample, niter=niter, seed=seed,
                   device=device, dtype=dtype, other=other, min_energy=min_energy, force=force, progress=not quiet)

    doc = host.run_step("extract-lora", "exact" if exact else "randomized", _run, finetuned=finetuned, base=base,
                        output=out)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"extracted a rank-{rank} LoRA of {doc['modules']} modules into {out} in {doc['seconds']:.1f}s "
               f"({doc['svd']} SVD {doc['svd_seconds']:.1f}s); kept energy min {doc['min_module_energy']:.4f}, mean "
               f"{doc['mean_module_energy']:.4f}; max relative error {doc['max_rel_error']:.3g}")
    click.echo("module  kind  rank  energy  rel_error")
    for name, m in doc["per_module"].items():
        click.echo(f"  {name}  {m['kind']}  {m['rank']}  {m['energy']:.6f}  {m['rel_error']:.3g}")
    if doc["modules_to_save"]:
        click.echo(f"saved in full (modules_to_save): {', '.join(doc['modules_to_save'])}")
    for note in doc["notes"]:
        click.echo(f"note: {note}", err=True)
