"""The quantize runner: validate, open, plan, run a quantizer, pack, stream to disk, publish.

``run_quantize(model, out, method=..., ...)`` is what ``adaptkit quantize`` runs (as the step ``quantize``);
``run_dequantize(model, out)`` writes a floating-point copy of a quantized checkpoint (step ``dequantize``).
The runner knows quantizers only by what they declare on their ``Quantizer`` (``formats``, ``accepts``,
``bits``, ``needs_calibration``, ``params``) and formats only through the format-module API
(:mod:`adaptkit.formats`); the contract an algorithm implements is :mod:`adaptkit.quantize.api`.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from adaptkit.errors import AdaptkitError, CheckpointError, ConfigError, OutputError
from adaptkit.quantize.api import QuantizeRequest, QuantizeResult, QuantSpec
from adaptkit.threads import available_cores, check_threads, single_thread  # noqa: F401 - re-exported

_LAYER_RE = re.compile(r"(^|\.)layers\.(\d+)\.")
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")

#: the common options of ``adaptkit quantize`` (``adaptkit.registry.QUANT_OPTIONS``) and their defaults
SPEC_DEFAULTS: dict[str, Any] = {"bits": 4, "group_size": 128, "sym": True, "act_order": False, "damp": 0.01,
                                 "partial_groups": False}
_FLAGS = {"bits": "--bits", "group_size": "--group-size", "sym": "--sym/--asym", "act_order": "--act-order",
          "damp": "--damp", "partial_groups": "--partial-groups"}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _threads:
    """torch's intra-op threads set to ``n`` inside the block (nothing when ``n`` is None), restored after."""

    def __init__(self, n: int | None) -> None:
        self.n = n

    def __enter__(self) -> None:
        if self.n is not None:
            import torch

            self.saved = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: Any) -> None:
        if self.n is not None:
            import torch

            torch.set_num_threads(self.saved)


def find_targets(ckpt: Any) -> list[str]:
    """Linear modules to quantize: 2-D floating-point ``*.weight`` tensors inside the decoder layers
    (``...layers.N...``). Embeddings, norms and ``lm_head`` stay in floating point (as transformers,
    GPTQModel and AutoAWQ do)."""
    out = []
    for name in ckpt.names():
        if not name.endswith(".weight") or not _LAYER_RE.search(name):
            continue
        info = ckpt.info(name)
        if len(info.shape) == 2 and info.dtype in _FLOAT_DTYPES:
            out.append(name[: -len(".weight")])
    return out


def auto_group_size(in_features: Iterable[int]) -> int:
    """128 when every ``in_features`` is a multiple of 128, else the largest power of two >= 32 dividing all
    of them (128 when none does: the format's shape check then explains)."""
    sizes = list(in_features)
    for gs in (128, 64, 32):
        if all(i % gs == 0 for i in sizes):
            return gs
    return 128


def _file_bytes(ckpt: Any) -> int:
    """Bytes of the input's weight files (what the summary compares with the output's shards)."""
    try:
        return sum(Path(f).stat().st_size for f in ckpt.files)
    except (OSError, AttributeError, TypeError):
        return int(getattr(ckpt, "total_bytes", 0) or 0)


def _layer_of(module: str) -> str:
    m = _LAYER_RE.search(module)
    return f"layer {m.group(2)}" if m else module


def _producer(entry: Any) -> str:
    from adaptkit import __version__

    if entry is None or getattr(entry.owner, "builtin", False):
        return f"adaptkit {__version__}"
    return f"{entry.owner.distribution} {entry.owner.version}".strip()


def _resolve_quantizer(method: str | None, quantizer: Any, host: Any) -> tuple[Any, Any]:
    """(Quantizer component, registry entry or None)."""
    if quantizer is not None:
        return quantizer, None
    if not method:
        raise ConfigError("no quantizer given: pass --method NAME")
    entry = host.quantizers.entry(method)  # ConfigError naming the known quantizers
    return entry.component, entry


def _refuse_unaccepted(q: Any, explicit: Iterable[str]) -> None:
    for opt in explicit:
        if opt in SPEC_DEFAULTS and opt not in q.accepts:
            takes = [_FLAGS[a] for a in q.accepts if a in _FLAGS]
            takes += [f"-o {p.name}={_show(p.default)}" for p in q.params if not p.required]
            raise ConfigError(
                f"{_FLAGS[opt]}: quantizer {q.name!r} does not use it (it takes {', '.join(takes) or 'no options'})"
            )


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _spec_problem_generic(spec: QuantSpec, q: Any) -> str | None:
    if "group_size" in q.accepts:
        gs = spec.group_size
        if gs != -1 and (gs < 16 or gs & (gs - 1)):
            return f"--group-size {gs} is out of range: use -1 (per channel) or a power of two >= 16"
    if "damp" in q.accepts and not (0.0 < spec.damp < 1.0):
        return f"--damp {spec.damp} is out of range: use a fraction in (0, 1), e.g. 0.01"
    return None


def _suggest(fmt_mod: Any, shapes: list[tuple[int, int]], spec: QuantSpec, options: dict[str, Any], q: Any) -> str:
    """A change of --group-size (or --partial-groups) that makes every target storable, as a hint."""
    import dataclasses

    def ok(s: QuantSpec) -> bool:
        return all(fmt_mod.shape_problem(o, i, s, options) is None for o, i in shapes)

    hints = []
    if "group_size" in q.accepts:
        for gs in (128, 64, 32, 16, -1):
            if gs != spec.group_size and ok(dataclasses.replace(spec, group_size=gs)):
                hints.append(f"--group-size {gs} works for every target")
                break
    if "partial_groups" in q.accepts and not spec.partial_groups and ok(dataclasses.replace(spec, partial_groups=True)):
        hints.append("--partial-groups stores a shorter last group")
    return ("; " + " or ".join(hints)) if hints else ""


def run_quantize(
    model: str | Path,
    out: str | Path,
    *,
    method: str | None = None,
    quantizer: Any = None,
    bits: int | None = None,
    group_size: int | None = 128,
    sym: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    partial_groups: bool = False,
    explicit: Iterable[str] | None = None,
    calib: str | None = "builtin",
    nsamples: int = 128,
    seqlen: int = 512,
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
    requantize: bool = False,
    options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    show_progress: bool = True,
    note: Callable[[str], None] | None = None,
    host: Any = None,
    max_shard_size: int | None = None,
    entry: Any = None,
    threads: int | None = None,
) -> QuantizeResult:
    """Quantize ``model`` into ``out`` with the quantizer ``method`` (a registered name) or ``quantizer`` (a
    ``Quantizer`` component). ``explicit``: the common options the user set (the CLI knows); when None, those
    whose value differs from the default. ``group_size=None``: choose it from the targets (see
    :func:`auto_group_size`, reported through ``note``). ``entry``: the registry entry of ``quantizer`` (names
    its distribution in the output's metadata). ``progress`` receives the quantizer's status messages
    (the bar shows them too); ``show_progress`` draws the bar on stderr. ``threads``: torch's intra-op
    threads for the run (1 .. the cores available to this process; default: torch's setting), restored after;
    the output does not depend on it."""
    from adaptkit.formats import format_module
    from adaptkit.io import check_output_target

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    check_threads(threads)
    model = Path(model)
    out = Path(out)
    note = note or _stderr
    if host is None:
        from adaptkit.plugins import get_plugin_manager

        host = get_plugin_manager()
    q, found = _resolve_quantizer(method, quantizer, host)
    entry = entry or found  # the registry entry names the quantizer's distribution (the producer)
    name = q.name
    given = {"bits": bits, "group_size": group_size, "sym": sym, "act_order": act_order, "damp": damp,
             "partial_groups": partial_groups}
    if explicit is None:
        explicit = [k for k, v in given.items() if v is not None and v != SPEC_DEFAULTS[k]]
    explicit = list(explicit)
    _refuse_unaccepted(q, explicit)
    if bits is None or "bits" not in explicit:
        bits = bits if bits is not None and bits in q.bits else (4 if 4 in q.bits else q.bits[0])
    if bits not in q.bits:
        raise ConfigError(f"--bits {bits}: quantizer {name!r} produces {', '.join(map(str, q.bits))}-bit weights")
    fmt = q.formats[0]
    fmt_mod = format_module(fmt)
    opts = q.resolve_options(options, where="--option")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device {device!r}: use cpu or cuda[:N]")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
    if not model.exists():
        raise CheckpointError(f"{model}: no such model folder or file (adaptkit reads local checkpoints only)")

    def acc(key: str, value: Any) -> Any:
        return value if key in q.accepts and value is not None else SPEC_DEFAULTS[key]

    spec = QuantSpec(bits=bits, group_size=acc("group_size", group_size), sym=acc("sym", sym),
                     act_order=acc("act_order", act_order), damp=acc("damp", damp),
                     partial_groups=acc("partial_groups", partial_groups))
    why = _spec_problem_generic(spec, q)
    if why:
        raise ConfigError(why)
    why = fmt_mod.spec_problem(spec, opts)
    if why:
        raise ConfigError(f"quantizer {name!r} writes {fmt}: {why}")
    if q.needs_calibration:
        from adaptkit.quantize.calib import validate_source

        validate_source(calib, nsamples, seqlen)
    if model.resolve() == out.resolve():
        raise OutputError(f"{out}: the output folder must differ from the input model")
    check_output_target(out, force)

    ckpt = host.open_model(model)
    try:
        timings["open"] = time.perf_counter() - t0
        source_format = getattr(ckpt, "source_format", None)
        config = ckpt.config
        if source_format is not None and not requantize:
            raise CheckpointError(
                f"{model}: already quantized ({source_format}); quantizing again compounds the error: pass "
                "--requantize to quantize the dequantized weights, or use --method dequantize"
            )
        if config and config.get("quantization_config") is not None:
            qc = config["quantization_config"]
            qm = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
            raise CheckpointError(
                f"{model}: config.json records a quantization_config ({qm}) that no adaptkit loader dequantizes"
            )
        if config is None:
            raise CheckpointError(f"{model}: config.json is missing (needed to record quantization_config)")
        targets = find_targets(ckpt)
        if not targets:
            raise CheckpointError(f"{model}: no linear layers found under '...layers.N.' to quantize")
        shapes = [tuple(ckpt.info(t + ".weight").shape) for t in targets]
        if "group_size" in q.accepts and group_size is None:
            import dataclasses

            gs = auto_group_size(i for _, i in shapes)
            spec = dataclasses.replace(spec, group_size=gs)
            if gs != SPEC_DEFAULTS["group_size"]:
                odd = next(t for t, (_, i) in zip(targets, shapes) if i % 128)
                note(f"note: --group-size {gs} (in_features {ckpt.info(odd + '.weight').shape[1]} of {odd} is "
                     "not a multiple of 128; pass --group-size to choose)")
        for t, (o, i) in zip(targets, shapes):
            why = fmt_mod.shape_problem(o, i, spec, opts)
            if why:
                flag = f"--group-size {spec.group_size}: " if "group_size" in explicit else ""
                raise ConfigError(f"{flag}{t}.weight [{o}, {i}]: {why}{_suggest(fmt_mod, shapes, spec, opts, q)}")
        if spec.partial_groups and spec.group_size != -1:
            short = [(t, i) for t, (_, i) in zip(targets, shapes) if i % spec.group_size]
            if short:
                t, i = short[0]
                note(f"note: --partial-groups: {len(short)} of {len(targets)} linears end with a group of "
                     f"{i % spec.group_size} columns (e.g. {t}, in_features {i}); vLLM will not load this")
        if q.needs_calibration and spec.group_size > 0 and nsamples * seqlen < spec.group_size:
            raise ConfigError(
                f"--nsamples {nsamples} x --seqlen {seqlen} = {nsamples * seqlen} calibration tokens is shorter than one "
                f"group (--group-size {spec.group_size}): give at least {spec.group_size} tokens"
            )
        request = QuantizeRequest(
            model_dir=model, out_dir=out, method=name, spec=spec, calib=calib if q.needs_calibration else None,
            nsamples=nsamples, seqlen=seqlen, device=device, seed=seed, options=dict(opts), targets=tuple(targets),
            progress=None, checkpoint=ckpt, config=config, format=fmt,
        )
        impl = q.load()
        with _threads(threads):
            return _write(request, impl, fmt_mod, ckpt, q=q, producer=_producer(entry), force=force, t0=t0,
                          timings=timings, max_shard_size=max_shard_size, progress=progress,
                          show_progress=show_progress)
    finally:
        ckpt.close()


def _write(request: QuantizeRequest, impl: Callable[..., Any], fmt_mod: Any, ckpt: Any, *, q: Any, producer: str,
           force: bool, t0: float, timings: dict[str, float], max_shard_size: int | None,
           progress: Callable[[str], None] | None, show_progress: bool) -> QuantizeResult:
    import torch

    from adaptkit.io import ShardedWriter, TensorSpec, torch_dtype
    from adaptkit.io.publish import file_sha256, publish_output
    from adaptkit.progress import Progress

    t_plan = time.perf_counter()
    name, fmt, spec, opts = request.method, request.format, request.spec, request.options
    targets = set(request.targets)
    weight_names = {t + ".weight" for t in targets}
    weight_dtype = ckpt.info(request.targets[0] + ".weight").dtype
    specs: list[TensorSpec] = []
    planned: dict[str, tuple[str, tuple]] = {}
    for n in ckpt.names():
        if n in weight_names:
            module = n[: -len(".weight")]
            o, i = ckpt.info(n).shape
            try:
                rows = fmt_mod.tensor_specs(module, o, i, spec, opts, lambda n=n: ckpt.get(n))
            except ValueError as e:
                raise ConfigError(f"{n}: {e}") from None
            for tn, dt, sh in rows:
                specs.append(TensorSpec(tn, dt, tuple(sh)))
                planned[tn] = (dt, tuple(sh))
        else:
            info = ckpt.info(n)
            specs.append(TensorSpec(n, info.dtype, tuple(info.shape)))
    qconfig = fmt_mod.quantization_config(spec, method=name, options=opts, weight_dtype=weight_dtype)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    item_type = fmt_mod.ITEM
    done: set[str] = set()
    replaced: set[str] = set()
    quantized: list[str] = []
    passthrough = 0
    timings["plan"] = time.perf_counter() - t_plan

    def bad(msg: str) -> AdaptkitError:
        return AdaptkitError(f"quantizer {name!r} {msg}")

    with publish_output(request.out_dir, kind="quantize", force=force,
                        title=f"{Path(request.model_dir).name} ({name}, {fmt})") as pub:
        bar = Progress(len(request.targets), f"quantize {name}", unit="linears", enabled=show_progress)

        def report(message: str) -> None:
            bar.set_status(message)
            if progress is not None:
                progress(message)

        request.progress = report
        phases = request.phases
        t_q = time.perf_counter()
        with bar:
            writer = ShardedWriter(pub.path, specs, metadata=fmt_mod.file_metadata(qconfig, producer), **kw)
            try:
                for key, item in impl(request):
                    if isinstance(item, item_type):
                        if key not in targets:
                            raise bad(f"returned {key!r}, which is not a target linear")
                        if key in done:
                            raise bad(f"returned {key!r} twice")
                        info = ckpt.info(key + ".weight")
                        if tuple(item.shape) != tuple(info.shape):
                            raise bad(f"returned {key} with shape {list(item.shape)}, not {list(info.shape)}")
                        t_pack = time.perf_counter()
                        try:
                            with single_thread():
                                item.validate(key)
                                packed = fmt_mod.pack(item, spec, opts, weight_dtype=info.dtype)
                        except ValueError as e:
                            raise bad(f"produced an invalid result: {key}: {e}") from None
                        t_w = time.perf_counter()
                        phases["pack"] = phases.get("pack", 0.0) + t_w - t_pack
                        for suffix, tensor in packed.items():
                            tn = f"{key}.{suffix}"
                            if tn not in planned:
                                raise bad(f"result for {key} packs an unplanned tensor {tn!r} ({fmt})")
                            try:
                                writer.write(tn, tensor)
                            except ValueError as e:
                                raise bad(f"produced a result the {fmt} plan cannot hold: {e}") from None
                        phases["write"] = phases.get("write", 0.0) + time.perf_counter() - t_w
                        done.add(key)
                        quantized.append(key)
                        bar.advance(status=_layer_of(key))
                    elif isinstance(item, torch.Tensor):
                        if key in weight_names or key not in ckpt or key in replaced:
                            raise bad(f"cannot replace tensor {key!r}")
                        info = ckpt.info(key)
                        if tuple(item.shape) != tuple(info.shape):
                            raise bad(f"replacement {key} has shape {tuple(item.shape)}, not {tuple(info.shape)}")
                        t_w = time.perf_counter()
                        writer.write(key, item.detach().to("cpu", torch_dtype(info.dtype)).contiguous())
                        phases["write"] = phases.get("write", 0.0) + time.perf_counter() - t_w
                        replaced.add(key)
                    else:
                        raise bad(f"yielded a {type(item).__name__} for {key!r}; the {fmt} format takes "
                                  f"{item_type.__name__} results (or a torch.Tensor replacing a tensor)")
                missing = [t for t in request.targets if t not in done]
                if missing:
                    raise bad(f"did not quantize {len(missing)} linears (first: {missing[0]})")
                timings["quantize"] = time.perf_counter() - t_q
                t_rest = time.perf_counter()
                for n in ckpt.names():
                    if n in weight_names or n in replaced:
                        continue
                    writer.write(n, ckpt.get(n))
                    passthrough += 1
                writer.close()
            except BaseException:
                writer.abort()
                raise
        pub.copy_aux(ckpt)
        cfg = dict(request.config or {})
        cfg["quantization_config"] = qconfig
        pub.write_json("config.json", cfg)
        for fname, doc in fmt_mod.extra_files(qconfig).items():
            pub.write_json(fname, doc)
        bytes_out = sum(p.stat().st_size for p in pub.path.iterdir() if p.suffix == ".safetensors")
        timings["write"] = time.perf_counter() - t_rest
        t_pub = time.perf_counter()
        _describe(pub, request, q, fmt_mod, ckpt, qconfig, producer, file_sha256)
    timings["publish"] = time.perf_counter() - t_pub  # input hashes, card, manifest, fsync, rename
    return QuantizeResult(
        out_dir=request.out_dir, method=name, format=fmt, spec=spec, quantized=quantized, passthrough=passthrough,
        bytes_in=_file_bytes(ckpt), bytes_out=bytes_out, seconds=time.perf_counter() - t0,
        quantization_config=qconfig, timings=timings, loader=str(getattr(ckpt, "loader", "") or ""),
        source_format=getattr(ckpt, "source_format", None), options=dict(opts), phases=dict(phases),
    )


def _describe(pub: Any, request: QuantizeRequest, q: Any, fmt_mod: Any, ckpt: Any, qconfig: dict[str, Any],
              producer: str, file_sha256: Callable[..., Any]) -> None:
    """Model card and provenance of a quantized output."""
    from dataclasses import asdict

    spec = {k: v for k, v in asdict(request.spec).items() if k in q.accepts or k == "bits"}
    loader = str(getattr(ckpt, "loader", "") or "")
    source_format = getattr(ckpt, "source_format", None)
    inp = {"path": str(request.model_dir), "loader": loader, "source_format": source_format,
           "sha256": file_sha256(list(ckpt.files))}
    calibration = None
    if q.needs_calibration:
        calibration = {"source": request.calib, "nsamples": request.nsamples, "seqlen": request.seqlen,
                       "seed": request.seed}
    pub.tags += ["quantized", request.format]
    pub.summary.append(
        f"`{Path(request.model_dir).name}` quantized with the `{request.method}` quantizer ({producer}) into the "
        f"**{request.format}** format: {fmt_mod.DESCRIPTION}. {len(request.targets)} linear layers inside the "
        "decoder layers are quantized; embeddings, norms and the LM head keep their floating-point weights."
    )
    rows = [f"* method: `{request.method}`", f"* format: `{request.format}`",
            *[f"* {k}: `{v}`" for k, v in spec.items()],
            *[f"* option {k}: `{v}`" for k, v in sorted(request.options.items())]]
    if calibration:
        rows.append(f"* calibration: `{calibration['source']}`, {calibration['nsamples']} x {calibration['seqlen']} "
                    f"tokens, seed {calibration['seed']}")
    pub.sections["Quantization"] = "\n".join(rows)
    src = f"* path: `{request.model_dir}`\n* loader: `{loader}`"
    if source_format:
        src += f"\n* dequantized on load from `{source_format}` (--requantize)"
    pub.sections["Input"] = src
    pub.provenance.update({
        "input": inp, "method": request.method, "quantizer": producer, "format": request.format, "spec": spec,
        "options": dict(request.options), "calibration": calibration, "targets": len(request.targets),
        "quantization_config": qconfig,
    })


def run_dequantize(model: str | Path, out: str | Path, *, force: bool = False, host: Any = None,
                   max_shard_size: int | None = None, show_progress: bool = True) -> QuantizeResult:
    """Write a floating-point copy of any checkpoint a dequantizing loader reads (GPTQ, AWQ, NF4, int8, GGUF):
    its tensors as the loader gives them, ``config.json`` without ``quantization_config``."""
    from adaptkit.io import ShardedWriter, TensorSpec, check_output_target
    from adaptkit.io.publish import file_sha256, publish_output
    from adaptkit.progress import Progress

    t0 = time.perf_counter()
    model, out = Path(model), Path(out)
    if host is None:
        from adaptkit.plugins import get_plugin_manager

        host = get_plugin_manager()
    if not model.exists():
        raise CheckpointError(f"{model}: no such model folder or file (adaptkit reads local checkpoints only)")
    if model.resolve() == out.resolve():
        raise OutputError(f"{out}: the output folder must differ from the input model")
    check_output_target(out, force)
    qc = host.open_model(model)
    try:
        source_format = getattr(qc, "source_format", None)
        if source_format is None:
            raise CheckpointError(
                f"{model}: not a quantized checkpoint adaptkit can dequantize (loader {getattr(qc, 'loader', '?')} "
                "read floating-point weights; GPTQ, AWQ, bitsandbytes and GGUF inputs are dequantized)"
            )
        timings = {"open": time.perf_counter() - t0}
        names = qc.names()
        deq = set(getattr(qc, "dequantized_names", names))
        specs = [TensorSpec(n, qc.info(n).dtype, tuple(qc.info(n).shape)) for n in names]
        kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        t1 = time.perf_counter()
        with publish_output(out, kind="dequantize", force=force,
                            title=f"{model.name} (dequantized from {source_format})") as pub:
            with Progress(len(deq), "dequantize", unit="tensors", enabled=show_progress) as bar:
                with ShardedWriter(pub.path, specs, **kw) as writer:
                    for n in names:
                        writer.write(n, qc.get(n))
                        if n in deq:
                            bar.advance(status=_layer_of(n))
            timings["write"] = time.perf_counter() - t1
            pub.copy_aux(qc)
            pub.write_json("config.json", qc.config)
            (pub.path / "quantize_config.json").unlink(missing_ok=True)
            bytes_out = sum(p.stat().st_size for p in pub.path.iterdir() if p.suffix == ".safetensors")
            loader = str(getattr(qc, "loader", "") or "")
            pub.tags.append("dequantized")
            pub.summary.append(
                f"A floating-point copy of `{model.name}` ({source_format}): every quantized weight dequantized "
                f"by the `{loader}` loader; the model is as accurate as the quantized one, not the original."
            )
            pub.sections["Input"] = f"* path: `{model}`\n* loader: `{loader}`\n* source format: `{source_format}`"
            pub.provenance.update({
                "input": {"path": str(model), "loader": loader, "source_format": source_format,
                          "sha256": file_sha256(list(qc.files))},
                "method": "dequantize", "dequantized_tensors": len(deq),
            })
        timings["publish"] = time.perf_counter() - t1 - timings["write"]
        return QuantizeResult(
            out_dir=out, method="dequantize", format="float", spec=QuantSpec(),
            quantized=[n[: -len(".weight")] if n.endswith(".weight") else n for n in names if n in deq],
            passthrough=len(specs) - len(deq), bytes_in=_file_bytes(qc), bytes_out=bytes_out,
            seconds=time.perf_counter() - t0, quantization_config={}, timings=timings, loader=loader,
            source_format=source_format,
        )
    finally:
        qc.close()
