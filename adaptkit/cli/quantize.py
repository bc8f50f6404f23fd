"""``adaptkit quantize MODEL OUT --method NAME``: quantize a model with any registered quantizer (rtn, nf4, gptq,
awq from adaptkit-quant, or a third-party one), or dequantize a quantized one (``--method dequantize``).

Thin: parses options, builds the call and runs it as the step ``quantize`` (or ``dequantize``) through
``host.run_step``; the runner is :mod:`adaptkit.quantize.runner`."""
from __future__ import annotations

import json
from typing import Any

import click

from adaptkit.errors import ConfigError

DEQUANTIZE = "dequantize"  #: the pseudo-method that writes a floating-point copy

#: click parameter name -> QuantSpec field (adaptkit.registry.QUANT_OPTIONS)
_COMMON = {"bits": "bits", "group_size": "group_size", "sym": "sym", "act_order": "act_order", "damp": "damp",
           "partial_groups": "partial_groups"}


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _method_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--option {pair!r}: expected KEY=VALUE")
        out[key] = _parse_value(raw)
    return out


def _explicit(ctx: click.Context) -> list[str]:
    """The common options the user typed (not their defaults)."""
    from click.core import ParameterSource

    return [field for param, field in _COMMON.items()
            if ctx.get_parameter_source(param) not in (None, ParameterSource.DEFAULT)]


@click.command("quantize")
@click.argument("model", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--method", "-m", required=True, metavar="NAME",
              help="Quantizer: rtn, nf4, gptq, awq (or any registered by a plugin), or 'dequantize'.")
@click.option("--bits", type=int, default=None, help="Bits per weight (what the quantizer produces: 2, 3, 4, 8; "
              "default 4, or the quantizer's only width).")
@click.option("--group-size", type=int, default=None,
              help="Input columns per scale/zero group; -1 = one group per output channel. Default: 128 when "
                   "every target's in_features is a multiple of 128, else the largest power of two >= 32 "
                   "dividing them all.")
@click.option("--sym/--asym", default=True, show_default=True, help="Symmetric (zero point 2**(bits-1)) or asymmetric grid.")
@click.option("--act-order", is_flag=True, help="GPTQ desc_act: quantize columns by decreasing Hessian diagonal.")
@click.option("--partial-groups", is_flag=True,
              help="GPTQ format: allow a shorter last group when in_features is not a multiple of --group-size "
                   "(transformers + GPTQModel's gptq_torch kernel read it; vLLM does not).")
@click.option("--damp", type=float, default=0.01, show_default=True, help="GPTQ dampening (fraction of mean diag(H)).")
@click.option("--calib", default="builtin", show_default=True, metavar="FILE.jsonl|builtin[-news|-wiki|-pydoc]",
              help="Calibration text for quantizers that need it (gptq, awq): JSON lines with a 'text' field, or "
                   "built-in real English prose (news + Wikipedia from gensim's wheel; -news, -wiki, -pydoc for "
                   "one source).")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration sequences.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per calibration sequence.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for calibration sampling.")
@click.option("--threads", type=int, default=None,
              help="Torch compute threads, 1 to the number of cores (default: torch's, all cores). The output does "
                   "not depend on it.")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
              help="Method-specific option (see `adaptkit plugins`), e.g. -o blocksize=64 for nf4. Repeatable.")
@click.option("--requantize", is_flag=True,
              help="Accept an already quantized MODEL (GPTQ/AWQ/NF4/GGUF): quantize its dequantized weights "
                   "(the errors compound).")
@click.option("--max-shard-size", default=None, metavar="SIZE", help="Split the output into shards (e.g. 2GB).")
@click.option("--force", is_flag=True, help="Replace a non-empty OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.pass_context
def quantize(ctx: click.Context, model: str, out: str, method: str, bits: int | None, group_size: int | None,
             sym: bool, act_order: bool, partial_groups: bool, damp: float, calib: str, nsamples: int, seqlen: int,
             device: str, seed: int, threads: int | None, options: tuple[str, ...], requantize: bool,
             max_shard_size: str | None, force: bool, as_json: bool) -> None:
    """Quantize MODEL into OUT, or dequantize a GPTQ/AWQ/NF4 MODEL (--method dequantize).

    Writes the format the quantizer declares (GPTQ v1 for rtn/gptq, AWQ GEMM for awq, bitsandbytes NF4 for
    nf4) with quantization_config in config.json, which transformers and vLLM load. One progress bar on
    stderr; OUT appears only when complete, with a model card and provenance (adaptkit.json).
    """
    from adaptkit.cli import get_host

    host = get_host()
    size = None
    if max_shard_size:
        from adaptkit.io import parse_size

        size = parse_size(max_shard_size)
    explicit = _explicit(ctx)
    from adaptkit.threads import check_threads

    check_threads(threads)  # before anything is read: one line, nothing written
    if method == DEQUANTIZE:
        if options:
            raise ConfigError("--option is not used with --method dequantize")
        if explicit or requantize:
            flags = [f"--{e.replace('_', '-')}" for e in explicit] + (["--requantize"] if requantize else [])
            raise ConfigError(f"{flags[0]} is not used with --method dequantize")

        def run() -> Any:
            from adaptkit.quantize.runner import run_dequantize

            return run_dequantize(model, out, force=force, host=host, max_shard_size=size)

        result = host.run_step("dequantize", DEQUANTIZE, run, model=model, output=out)
    else:
        comp = host.quantizers.get(method)  # ConfigError naming the known quantizers
        opts = comp.resolve_options(_method_options(options), where="--option")

        def run() -> Any:
            from adaptkit.quantize.runner import run_quantize

            return run_quantize(
                model, out, quantizer=comp, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                damp=damp, partial_groups=partial_groups, explicit=explicit, calib=calib, nsamples=nsamples,
                seqlen=seqlen, device=device, seed=seed, force=force, requantize=requantize, options=opts,
                host=host, max_shard_size=size, entry=host.quantizers.entry(method), threads=threads,
            )

        result = host.run_step("quantize", comp.name, run, model=model, output=out, format=comp.formats[0])
    doc = result.to_json()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    b_in, b_out = doc["bytes_in"], doc["bytes_out"]
    if b_out and b_in > b_out:
        size_note = f"{b_in / b_out:.2f}x smaller"
    elif b_out:
        size_note = f"{b_out / b_in:.2f}x larger than the input" if b_in else "input size unknown"
    else:
        size_note = "empty"
    what = "tensors dequantized" if method == DEQUANTIZE else "linears"
    click.echo(
        f"{doc['method']}: wrote {out} ({doc['format']}, {doc['quantized_modules']} {what}, "
        f"{b_out / 2**20:.1f} MiB, {size_note}) in {doc['seconds']:.1f}s"
    )
