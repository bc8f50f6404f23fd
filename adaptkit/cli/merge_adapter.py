"""``adaptkit merge-adapter BASE ADAPTER [ADAPTER ...] OUT``: merge PEFT adapters into a base model (or, with
``--into-adapter``, several LoRA adapters into one LoRA adapter). The work is in :mod:`adaptkit.adapters.merge`;
this module parses options only (click at import time, torch inside the command)."""
from __future__ import annotations

import json
from typing import Any

import click

from adaptkit.errors import ConfigError


def parse_weights(raw: str | None, n: int) -> list[float] | None:
    """``"0.7,0.3"`` (or spaces) -> [0.7, 0.3]; one value per adapter."""
    if raw is None:
        return None
    parts = [p for p in raw.replace(",", " ").split() if p]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--weights {raw!r}: expected numbers separated by commas, e.g. 0.7,0.3") from None
    if len(vals) != n:
        raise ConfigError(f"--weights {raw!r}: {len(vals)} weight(s) for {n} adapter(s); give one per adapter")
    if any(v != v or v in (float("inf"), float("-inf")) for v in vals):
        raise ConfigError(f"--weights {raw!r}: weights must be finite")
    return vals


def parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--option {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def base_quantization_option(kind: str, blocksize: int | None, double_quant: bool | None,
                             quant_dtype: str | None) -> Any:
    """The command line's QLoRA policy, or None (``auto``: what the adapters record)."""
    from adaptkit.adapters import qlora

    if kind == "auto":
        if blocksize is not None or double_quant is not None or quant_dtype is not None:
            raise ConfigError("--blocksize/--double-quant/--quant-dtype need --base-quantization nf4, fp4 or int8")
        return None
    if kind == "none":
        return qlora.BaseQuantization(source="--base-quantization none")
    doc: dict[str, Any] = {"quant_type": kind, "blocksize": 64 if blocksize is None else blocksize,
                           "double_quant": bool(double_quant), "dtype": quant_dtype}
    return qlora.from_dict(doc, source="--base-quantization")


@click.command("merge-adapter")
@click.argument("paths", nargs=-1, required=True, metavar="BASE ADAPTER [ADAPTER ...] OUT")
@click.option("--weights", default=None, metavar="W1,W2,...",
              help="One weight per adapter (default 1 each). Into weights: scales each LoRA delta (PEFT's set_scale).")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="Output dtype of floating tensors (auto: the base's; --into-adapter: the adapters').")
@click.option("--device", default="cpu", show_default=True, help="Compute device: cpu or cuda[:N].")
@click.option("--base-quantization", "base_quant", default="auto", show_default=True,
              type=click.Choice(["auto", "none", "nf4", "fp4", "int8"]),
              help="QLoRA: the quantization the base had while the adapter was trained; its linear weights are "
                   "round-tripped through bitsandbytes before merging. auto: what the adapter records "
                   "(adaptkit.json base_quantization, transformers/PEFT hints); none: merge into the weights as given.")
@click.option("--blocksize", type=int, default=None, help="With --base-quantization nf4/fp4: block size (default 64).")
@click.option("--double-quant/--no-double-quant", "double_quant", default=None,
              help="With --base-quantization nf4/fp4: double quantization of the block absmax (default off).")
@click.option("--quant-dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="With --base-quantization: dtype the base was loaded in before quantizing (default: as stored).")
@click.option("--into-adapter", is_flag=True,
              help="Merge the LoRA adapters into ONE LoRA adapter (OUT is a PEFT folder) instead of into the base.")
@click.option("--method", "-m", default=None, metavar="NAME",
              help="--into-adapter: merge method applied to the weight deltas (default linear; task_arithmetic, "
                   "ties, dare_ties, dare_linear, ... any registered one).")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
              help="--into-adapter: a parameter of the merge method (e.g. -o density=0.5, -o normalize=false).")
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="--into-adapter: rank of the merged adapter (default: the adapters' common rank).")
@click.option("--exact", is_flag=True, help="--into-adapter: exact SVD instead of the randomized one.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of randomized SVD probes and DARE masks.")
@click.option("--assume-same-base", is_flag=True,
              help="--into-adapter: accept adapters whose configs name different bases.")
@click.option("--max-shard-size", default=None, metavar="SIZE", help="Largest output shard (e.g. 2GB; default 5GB).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar on stderr.")
def merge_adapter(paths: tuple[str, ...], weights: str | None, dtype: str, device: str, base_quant: str,
                  blocksize: int | None, double_quant: bool | None, quant_dtype: str | None, into_adapter: bool,
                  method: str, options: tuple[str, ...], rank: int | None, exact: bool, seed: int,
                  assume_same_base: bool, max_shard_size: str | None, force: bool, as_json: bool,
                  quiet: bool) -> None:
    """Merge PEFT adapters (LoRA, rsLoRA, DoRA, IA3) into BASE and write the full model to OUT.

    BASE is any checkpoint a loader reads (safetensors, GGUF, GPTQ/AWQ/NF4 dequantized on load). Every tensor is
    computed in fp32 and rounded once, one tensor at a time, with PEFT's merge semantics. A QLoRA adapter is
    merged into the quantize-dequantized base it was trained on (see --base-quantization). With --into-adapter
    the LoRA adapters are merged into one LoRA adapter instead (method on the deltas, truncated SVD to --rank).
    """
    from adaptkit.adapters import tune_blas, tune_openmp

    tune_openmp()  # before torch is imported
    tune_blas()  # before numpy is imported
    from adaptkit.cli import get_host

    if len(paths) < 3:
        raise click.UsageError("expected BASE, at least one ADAPTER and OUT")
    base, adapters, out = paths[0], list(paths[1:-1]), paths[-1]
    w = parse_weights(weights, len(adapters))
    host = get_host()
    if into_adapter:
        if base_quant != "auto" or blocksize is not None or double_quant is not None or quant_dtype is not None:
            raise ConfigError("--base-quantization and its options apply when merging into the base, not with "
                              "--into-adapter (the merged adapter keeps the adapters' recorded policy)")
        if max_shard_size:
            raise ConfigError("--max-shard-size applies when merging into the base, not with --into-adapter")
        from adaptkit.adapters.merge import merge_into_adapter

        def _run() -> Any:
            return merge_into_adapter(host, base, adapters, out, method=method or "linear",
                                      options=parse_options(options),
                                      weights=w, rank=rank, exact=exact, seed=seed, device=device,
                                      dtype=None if dtype == "auto" else dtype, assume_same_base=assume_same_base,
                                      force=force, progress=not quiet)

        doc = host.run_step("merge-adapter", method or "linear", _run, base=base, adapters=adapters, output=out)
        if as_json:
            click.echo(json.dumps(doc, indent=2))
            return
        click.echo(f"merged {len(adapters)} adapters with {doc['method']} into a rank-{doc['rank']} LoRA at {out} "
                   f"({doc['modules']} modules; reconstruction error max {doc['max_rel_error']:.3g}, mean "
                   f"{doc['mean_rel_error']:.3g}) in {doc['seconds']:.1f}s")
        click.echo("module  rank  energy  rel_error")
        for name, m in doc["per_module"].items():
            click.echo(f"  {name}  {m['rank']}  {m['energy']:.6f}  {m['rel_error']:.3g}")
        return
    if method is not None or options or rank is not None or exact or assume_same_base:
        raise ConfigError("--method/--option/--rank/--exact/--assume-same-base apply to --into-adapter only")
    policy = base_quantization_option(base_quant, blocksize, double_quant, quant_dtype)
    shard = None
    if max_shard_size:
        from adaptkit.io import parse_size

        try:
            shard = parse_size(max_shard_size)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"--max-shard-size: {exc}") from None
    from adaptkit.adapters.merge import merge_into_weights

    def _run_w() -> Any:
        return merge_into_weights(host, base, adapters, out, weights=w, dtype=None if dtype == "auto" else dtype,
                                  device=device, base_quantization=policy, force=force, max_shard_size=shard,
                                  progress=not quiet)

    doc = host.run_step("merge-adapter", "into-weights", _run_w, base=base, adapters=adapters, output=out)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    bq = doc["base_quantization"]
    qtxt = ""
    if bq.get("quant_type", "none") != "none":
        qtxt = (f"; base round-tripped through {bq['quant_type']} ({doc['roundtrip_tensors']} linears, from {bq['source']})"
                if doc["base_quantization_applied"] else f"; base already stored as {doc['base'].get('source_format')}")
    click.echo(f"merged {len(adapters)} adapter(s) into {base}: {doc['changed_tensors']} of {doc['tensors']} tensors "
               f"changed, wrote {out} in {doc['seconds']:.1f}s{qtxt}")
    for note in doc["notes"]:
        click.echo(f"note: {note}", err=True)
