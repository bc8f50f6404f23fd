"""The quantize driver: validate, plan, run an algorithm, pack, stream to disk, publish atomically.

``run_quantize(model, out, method=..., ...)`` is what ``adaptkit quantize`` calls. Algorithms plug in through
the contract in :mod:`adaptkit_quant.api`; formats live in :mod:`adaptkit_quant.formats`.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable

from adaptkit.errors import AdaptkitError, CheckpointError, ConfigError, OutputError

from adaptkit_quant.api import SUPPORTED_BITS, QuantizedLinear, QuantizeRequest, QuantizeResult, QuantSpec

#: method -> output format. Third-party quantizers declare ``formats=(...)`` on their Quantizer; the first wins.
DEFAULT_FORMATS = {"rtn": "gptq", "gptq": "gptq", "awq": "awq", "nf4": "bnb-nf4"}
FORMATS = ("gptq", "awq", "bnb-nf4")
CALIB_METHODS = ("gptq", "awq")

_LAYER_RE = re.compile(r"(^|\.)layers\.(\d+)\.")


def find_targets(ckpt: Any) -> list[str]:
    """Linear modules to quantize: 2-D ``*.weight`` tensors inside the decoder layers (``...layers.N...``).

    Embeddings, norms, and ``lm_head`` stay in floating point (as transformers, GPTQModel and AutoAWQ do)."""
    out = []
    for name in ckpt.names():
        if not name.endswith(".weight") or not _LAYER_RE.search(name):
            continue
        info = ckpt.info(name)
        if len(info.shape) == 2 and info.dtype in ("F32", "F16", "BF16", "F64"):
            out.append(name[: -len(".weight")])
    return out


def detect_quantized(config: dict | None) -> str | None:
    """The quantization method recorded in ``config.json`` (``gptq``/``awq``/``bitsandbytes``/...), or None."""
    if not config:
        return None
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if isinstance(qc, dict):
        return str(qc.get("quant_method") or "unknown")
    return "unknown"


def validate_spec(method: str, fmt: str, spec: QuantSpec) -> None:
    if fmt == "bnb-nf4":
        if spec.bits != 4:
            raise ConfigError(f"--bits {spec.bits}: nf4 is a 4-bit format (use --bits 4)")
        return
    if spec.bits not in SUPPORTED_BITS:
        raise ConfigError(f"--bits {spec.bits} is out of range: {method} supports {', '.join(map(str, SUPPORTED_BITS))}")
    if fmt == "awq" and spec.bits != 4:
        raise ConfigError(f"--bits {spec.bits}: the AWQ GEMM format stores 4-bit weights only")
    gs = spec.group_size
    if gs != -1 and (gs < 16 or gs & (gs - 1)):
        raise ConfigError(f"--group-size {gs} is out of range: use -1 (per channel) or a power of two >= 16")
    if fmt == "awq" and gs == -1:
        raise ConfigError("--group-size -1: the AWQ GEMM format needs a group size (e.g. 128)")
    if spec.partial_groups and fmt != "gptq":
        raise ConfigError(f"--partial-groups: only the GPTQ format can store a shorter last group, not {fmt}")
    if not (0.0 < spec.damp < 1.0):
        raise ConfigError(f"--damp {spec.damp} is out of range: use a fraction in (0, 1), e.g. 0.01")


def validate_calib(calib: str | None, nsamples: int, seqlen: int) -> None:
    """Cheap checks of the calibration source before any model is loaded (the algorithm tokenizes it)."""
    if nsamples < 1:
        raise ConfigError(f"--nsamples {nsamples} must be >= 1")
    if seqlen < 8:
        raise ConfigError(f"--seqlen {seqlen} must be >= 8")
    from adaptkit_quant.calib import BUILTIN_SOURCES

    if calib in (None, "") or calib in BUILTIN_SOURCES:
        return  # built-in sources are checked when they are read (calib.py)
    p = Path(calib)
    if not p.is_file():
        raise ConfigError(f"{calib}: calibration file not found (give a .jsonl file with a 'text' field per line, or one of {', '.join(BUILTIN_SOURCES)})")
    texts = 0
    chars = 0
    with p.open("r", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{calib}:{lineno}: not valid JSON ({e.msg})") from None
            text = row.get("text") if isinstance(row, dict) else row if isinstance(row, str) else None
            if not isinstance(text, str):
                raise ConfigError(f"{calib}:{lineno}: each line must be a JSON object with a string 'text' field")
            texts += 1
            chars += len(text)
    if texts == 0:
        raise ConfigError(f"{calib}: calibration file is empty (no JSON lines with a 'text' field)")
    # a token is at least one character: fewer characters than one sequence can never fill a sample
    if chars < seqlen:
        raise ConfigError(
            f"{calib}: calibration text is too short ({chars} characters in {texts} lines; need at least "
            f"--seqlen {seqlen} tokens for one sample)"
        )


def _resolve_method(method: str, host: Any = None) -> tuple[str, Callable[..., Any] | None, str]:
    """(short name, impl or None for built-in formats handled here, output format)."""
    if method == "dequantize":
        return "dequantize", None, "float"
    if host is None:
        try:
            from adaptkit.plugins import get_plugin_manager

            host = get_plugin_manager()
        except Exception:  # noqa: BLE001 - fall back to this distribution's own quantizers
            host = None
    comp = None
    if host is not None:
        comp = host.quantizers.get(method)  # ConfigError naming known methods if unknown
    else:
        from adaptkit_quant.plugin import QUANTIZERS

        by_name = {q.name: q for q in QUANTIZERS}
        if method not in by_name:
            raise ConfigError(f"unknown quantizer {method!r} (known: {', '.join(sorted(by_name))}, dequantize)")
        comp = by_name[method]
    name = comp.name
    fmt = DEFAULT_FORMATS.get(name) or (comp.formats[0] if comp.formats else "")
    if comp.formats and fmt not in comp.formats:
        fmt = comp.formats[0]
    if fmt not in FORMATS:
        raise ConfigError(f"quantizer {method!r} declares no output format adaptkit can write (known: {', '.join(FORMATS)})")
    if fmt == "bnb-nf4":
        return name, None, fmt
    return name, comp.load, fmt  # loaded after the cheap validations (the impl may import torch etc.)


def run_quantize(
    model: str | Path,
    out: str | Path,
    *,
    method: str,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    partial_groups: bool = False,
    calib: str | None = "builtin",
    nsamples: int = 128,
    seqlen: int = 512,
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
    options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    host: Any = None,
    max_shard_size: int | None = None,
    impl: Callable[..., Any] | None = None,
) -> QuantizeResult:
    """Quantize ``model`` (a safetensors folder) into ``out`` with ``method``; see the module docstring."""
    from adaptkit.io import check_output_target, open_checkpoint

    t0 = time.perf_counter()
    model = Path(model)
    out = Path(out)
    report = progress or (lambda _m: None)
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order, damp=damp,
                     partial_groups=partial_groups)
    loader: Callable[[], Any] | None
    if impl is not None:
        name, fmt = method, DEFAULT_FORMATS.get(method, "gptq")
        loader = None
    else:
        name, loader, fmt = _resolve_method(method, host)
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ConfigError(f"--device {device!r}: use cpu or cuda[:N]")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
    if not model.exists():
        raise CheckpointError(f"{model}: no such model folder (adaptkit reads local checkpoints only)")
    if name != "dequantize":
        validate_spec(name, fmt, spec)
        if name in CALIB_METHODS:
            validate_calib(calib, nsamples, seqlen)
    if model.resolve() == out.resolve():
        raise OutputError(f"{out}: the output folder must differ from the input model folder")
    check_output_target(out, force)

    if name == "dequantize":
        return _run_dequantize(model, out, force=force, report=report, t0=t0, max_shard_size=max_shard_size)

    ckpt = open_checkpoint(model)
    try:
        config = ckpt.config
        already = detect_quantized(config)
        if already:
            raise CheckpointError(
                f"{model}: already quantized with {already}; dequantize first with "
                f"`adaptkit quantize {model} OUT --method dequantize`"
            )
        if config is None:
            raise CheckpointError(f"{model}: config.json is missing (needed to record quantization_config)")
        targets = find_targets(ckpt)
        if not targets:
            raise CheckpointError(f"{model}: no linear layers found under '...layers.N.' to quantize")
        fmt_mod = _format_module(fmt)
        for t in targets:
            o, i = ckpt.info(t + ".weight").shape
            why = fmt_mod.shape_problem(o, i, spec) if fmt != "bnb-nf4" else None
            if why:
                raise ConfigError(f"{t}.weight [{o}, {i}]: {why} (choose another --group-size)")
        if spec.partial_groups and spec.group_size != -1:
            short = [t for t in targets if ckpt.info(t + ".weight").shape[1] % spec.group_size]
            if short:
                i = ckpt.info(short[0] + ".weight").shape[1]
                report(f"--partial-groups: {len(short)} of {len(targets)} linears end with a group of "
                       f"{i % spec.group_size} columns (e.g. {short[0]}, in_features {i}); vLLM will not load this")
        request = QuantizeRequest(
            model_dir=model, out_dir=out, method=name, spec=spec, calib=calib, nsamples=nsamples,
            seqlen=seqlen, device=device, seed=seed, options=dict(options or {}), targets=tuple(targets),
            progress=report, checkpoint=ckpt, config=config,
        )
        if loader is not None:
            impl = loader()
        if fmt == "bnb-nf4":
            from adaptkit_quant import nf4

            return nf4.write_nf4(request, force=force, t0=t0, max_shard_size=max_shard_size, **(options or {}))
        return _write_int_format(request, impl, fmt, force=force, t0=t0, max_shard_size=max_shard_size)
    finally:
        ckpt.close()


def _format_module(fmt: str) -> Any:
    if fmt == "gptq":
        from adaptkit_quant.formats import gptq

        return gptq
    if fmt == "awq":
        from adaptkit_quant.formats import awq

        return awq
    from adaptkit_quant.formats import nf4 as nf4fmt

    return nf4fmt


def _write_int_format(
    request: QuantizeRequest, impl: Callable[..., Any], fmt: str, *, force: bool, t0: float, max_shard_size: int | None
) -> QuantizeResult:
    import torch

    from adaptkit.io import ShardedWriter, TensorSpec, atomic_output_dir, copy_aux_files

    ckpt = request.checkpoint
    assert ckpt is not None
    spec = request.spec
    fmt_mod = _format_module(fmt)
    targets = set(request.targets)
    weight_names = {t + ".weight" for t in targets}
    specs: list[TensorSpec] = []
    for n in ckpt.names():
        if n in weight_names:
            module = n[: -len(".weight")]
            o, i = ckpt.info(n).shape
            specs.extend(TensorSpec(tn, dt, tuple(sh)) for tn, dt, sh in fmt_mod.tensor_specs(module, o, i, spec))
        else:
            info = ckpt.info(n)
            specs.append(TensorSpec(n, info.dtype, tuple(info.shape)))
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    qconfig = fmt_mod.quantization_config(spec, method=request.method)
    done: set[str] = set()
    replaced: set[str] = set()
    quantized: list[str] = []
    with atomic_output_dir(request.out_dir, force=force) as tmp:
        writer = ShardedWriter(tmp, specs, metadata={"quantized_by": "adaptkit", "quant_method": qconfig["quant_method"]}, **kw)
        try:
            for key, item in impl(request):
                if isinstance(item, QuantizedLinear):
                    if key not in targets:
                        raise AdaptkitError(f"quantizer {request.method!r} returned {key!r}, which is not a target linear")
                    if key in done:
                        raise AdaptkitError(f"quantizer {request.method!r} returned {key!r} twice")
                    o, i = ckpt.info(key + ".weight").shape
                    if tuple(item.codes.shape) != (o, i):
                        raise AdaptkitError(f"quantizer {request.method!r}: {key} codes shape {tuple(item.codes.shape)} != {(o, i)}")
                    try:
                        item.validate(key, fmt=fmt)
                        packed = fmt_mod.pack(item)
                    except ValueError as e:
                        raise AdaptkitError(f"quantizer {request.method!r} produced an invalid result: {e}") from None
                    for suffix, tensor in packed.items():
                        writer.write(f"{key}.{suffix}", tensor)
                    done.add(key)
                    quantized.append(key)
                else:
                    if key in weight_names or key not in ckpt or key in replaced:
                        raise AdaptkitError(f"quantizer {request.method!r} cannot replace tensor {key!r}")
                    info = ckpt.info(key)
                    if tuple(item.shape) != tuple(info.shape):
                        raise AdaptkitError(f"quantizer {request.method!r}: replacement {key} has shape {tuple(item.shape)}, not {tuple(info.shape)}")
                    from adaptkit.io import torch_dtype

                    writer.write(key, item.detach().to("cpu", torch_dtype(info.dtype)).contiguous())
                    replaced.add(key)
            missing = [t for t in request.targets if t not in done]
            if missing:
                raise AdaptkitError(f"quantizer {request.method!r} did not quantize {len(missing)} linears (first: {missing[0]})")
            passthrough = 0
            for n in ckpt.names():
                if n in weight_names or n in replaced:
                    continue
                writer.write(n, ckpt.get(n))
                passthrough += 1
            writer.close()
        except BaseException:
            writer.abort()
            raise
        copy_aux_files(request.model_dir, tmp, config=False)
        cfg = dict(request.config or {})
        cfg["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n")
        if fmt == "gptq":
            # AutoGPTQ / older GPTQModel read quantize_config.json next to the weights
            legacy = {k: v for k, v in qconfig.items() if k not in ("quant_method", "pack_dtype")}
            legacy["quant_method"] = "gptq"
            (tmp / "quantize_config.json").write_text(json.dumps(legacy, indent=2) + "\n")
        bytes_out = sum(p.stat().st_size for p in tmp.iterdir() if p.suffix == ".safetensors")
    return QuantizeResult(
        out_dir=request.out_dir, method=request.method, format=fmt, spec=spec, quantized=quantized,
        passthrough=passthrough, bytes_in=ckpt.total_bytes, bytes_out=bytes_out,
        seconds=time.perf_counter() - t0, quantization_config=qconfig,
    )


def _run_dequantize(model: Path, out: Path, *, force: bool, report: Callable[[str], None], t0: float,
                    max_shard_size: int | None) -> QuantizeResult:
    """Write a floating-point copy of a GPTQ/AWQ/NF4 checkpoint (config without quantization_config)."""
    from adaptkit.io import ShardedWriter, TensorSpec, atomic_output_dir, copy_aux_files

    from adaptkit_quant.loader import detect, open_quantized

    if not detect(model):
        raise CheckpointError(f"{model}: not a GPTQ, AWQ or bitsandbytes-NF4 checkpoint adaptkit can dequantize")
    qc = open_quantized(model)
    try:
        specs = [TensorSpec(n, qc.info(n).dtype, tuple(qc.info(n).shape)) for n in qc.names()]
        kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        with atomic_output_dir(out, force=force) as tmp:
            with ShardedWriter(tmp, specs, **kw) as writer:
                for k, n in enumerate(qc.names()):
                    writer.write(n, qc.get(n))
                    if n in qc.dequantized_names:
                        report(f"dequantize: {n}")
            copy_aux_files(model, tmp, config=False)
            (tmp / "config.json").write_text(json.dumps(qc.config, indent=2) + "\n")
            for extra in ("quantize_config.json",):
                (tmp / extra).unlink(missing_ok=True)
            bytes_out = sum(p.stat().st_size for p in tmp.iterdir() if p.suffix == ".safetensors")
        return QuantizeResult(
            out_dir=out, method="dequantize", format="float", spec=QuantSpec(), quantized=list(qc.dequantized_modules),
            passthrough=len(specs) - len(qc.dequantized_names), bytes_in=qc.total_bytes, bytes_out=bytes_out,
            seconds=time.perf_counter() - t0, quantization_config={},
        )
    finally:
        qc.close()
