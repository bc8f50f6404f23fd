"""``adaptkit quantize MODEL OUT --method NAME``: quantize a safetensors model (rtn, nf4, gptq, awq, ...) or
dequantize a GPTQ/AWQ/NF4 one (``--method dequantize``). The quantizers and the driver live in the
``adaptkit-quant`` plugin distribution (``plugins/adaptkit-quant``); this module only parses options."""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from adaptkit.errors import ConfigError, PluginError


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _method_options(comp: Any, pairs: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--option {pair!r}: expected KEY=VALUE")
        param = comp.param(key) if comp is not None else None
        if param is None:
            known = ", ".join(p.name for p in (comp.params if comp is not None else ())) or "none"
            raise ConfigError(f"--option {key}: method {comp.name if comp else '?'!s} has no such option (known: {known})")
        out[key] = param.validate(_parse_value(raw), where=f"--option {key}")
    if comp is not None:
        for p in comp.params:
            if p.name not in out and not p.required:
                out[p.name] = p.default
    return out


@click.command("quantize")
@click.argument("model", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--method", "-m", required=True, metavar="NAME",
              help="Quantizer: rtn, nf4, gptq, awq (or any registered by a plugin), or 'dequantize'.")
@click.option("--bits", type=int, default=4, show_default=True, help="Bits per weight (2, 3, 4, 8; awq/nf4: 4).")
@click.option("--group-size", type=int, default=128, show_default=True,
              help="Input columns per scale/zero group; -1 = one group per output channel.")
@click.option("--sym/--asym", default=True, show_default=True, help="Symmetric (zero point 2**(bits-1)) or asymmetric grid.")
@click.option("--act-order", is_flag=True, help="GPTQ desc_act: quantize columns by decreasing Hessian diagonal.")
@click.option("--partial-groups", is_flag=True,
              help="GPTQ format: allow a shorter last group when in_features is not a multiple of --group-size "
                   "(transformers + GPTQModel's gptq_torch kernel read it; vLLM does not).")
@click.option("--damp", type=float, default=0.01, show_default=True, help="GPTQ dampening (fraction of mean diag(H)).")
@click.option("--calib", default="builtin", show_default=True, metavar="FILE.jsonl|builtin[-news|-wiki|-pydoc]",
              help="Calibration text for gptq/awq: JSON lines with a 'text' field, or built-in real English prose (news + Wikipedia from gensim's wheel; -news, -wiki, -pydoc for one source).")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration sequences.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per calibration sequence.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for calibration sampling.")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
              help="Method-specific option (see `adaptkit plugins`), e.g. -o blocksize=64 for nf4. Repeatable.")
@click.option("--max-shard-size", default=None, metavar="SIZE", help="Split the output into shards (e.g. 2GB).")
@click.option("--force", is_flag=True, help="Replace a non-empty OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def quantize(model: str, out: str, method: str, bits: int, group_size: int, sym: bool, act_order: bool,
             partial_groups: bool, damp: float, calib: str, nsamples: int, seqlen: int, device: str, seed: int, options: tuple[str, ...],
             max_shard_size: str | None, force: bool, as_json: bool) -> None:
    """Quantize MODEL (a safetensors folder) into OUT, or dequantize a GPTQ/AWQ/NF4 MODEL.

    Writes GPTQ v1 (rtn, gptq), AWQ GEMM (awq) or bitsandbytes NF4 (nf4) checkpoints with quantization_config
    in config.json, which transformers and vLLM load. Progress goes to stderr; OUT appears only when complete.
    """
    from adaptkit.cli import get_host

    try:
        from adaptkit_quant.driver import run_quantize
    except ImportError:
        raise PluginError(
            "adaptkit quantize needs the adaptkit-quant plugin: pip install -e plugins/adaptkit-quant"
        ) from None
    host = get_host()
    comp = None
    if method != "dequantize":
        comp = host.quantizers.get(method)  # ConfigError naming the known methods
    opts = _method_options(comp, options) if method != "dequantize" else {}
    if method == "dequantize" and options:
        raise ConfigError("--option is not used with --method dequantize")
    size = None
    if max_shard_size:
        from adaptkit.io import parse_size

        size = parse_size(max_shard_size)

    def progress(msg: str) -> None:
        click.echo(msg, err=True)
        sys.stderr.flush()

    result = run_quantize(
        model, out, method=comp.name if comp is not None else method, bits=bits, group_size=group_size, sym=sym,
        act_order=act_order, partial_groups=partial_groups, damp=damp, calib=calib, nsamples=nsamples, seqlen=seqlen, device=device, seed=seed,
        force=force, options=opts, progress=progress, host=host, max_shard_size=size,
    )
    doc = result.to_json()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        ratio = doc["bytes_in"] / doc["bytes_out"] if doc["bytes_out"] else 0.0
        click.echo(
            f"{doc['method']}: wrote {out} ({doc['format']}, {doc['quantized_modules']} linears, "
            f"{doc['bytes_out'] / 2**20:.1f} MiB, {ratio:.2f}x smaller) in {doc['seconds']:.1f}s"
        )
