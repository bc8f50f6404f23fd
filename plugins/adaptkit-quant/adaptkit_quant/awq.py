"""AWQ (Lin, Tang, Tang, Yang, Dang, Gan, Han 2023, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration"), implemented from the paper in torch, CPU and CUDA.

Per decoder layer (Llama-style: input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
mlp.{gate,up,down}_proj), on the layer's calibration inputs:

1. **scale search** for four groups, each a set of linears sharing an input and the op that produces that
   input: input_layernorm -> q/k/v (loss on the attention block output), v -> o (loss on o's output),
   post_attention_layernorm -> gate/up (loss on the MLP output), up -> down (loss on down's output). For a
   per-input-channel scale ``s`` the linears' weights become ``Q(W · diag(s)) · diag(s)⁻¹`` and the block
   output error ``mean((f(x) - f_q(x))²)`` is measured for ``s = 1`` (plain RTN) and for
   ``s = x̄^α / w̄^(1-α)`` (``duo_scaling``; ``s = x̄^α`` without it), ``α = i / n_grid``, ``i = 0 ..
   n_grid-1``, normalised by ``sqrt(max(s)·min(s))``. ``x̄`` is the mean |activation| per input channel,
   ``w̄`` the mean over rows of |W| divided by its group's max. The best ``s`` is kept (``s = 1`` is a
   candidate, so the search never does worse than RTN on the calibration data).
2. **folding**: ``s⁻¹`` is folded into the producing op (the RMSNorm weight, or the rows of v/up and
   their biases) and ``s`` into the linears' input columns. This is an exact re-parametrisation of the
   fp function. With grouped-query attention (fewer kv heads than heads) the v->o scales are tied across
   the query heads that share a kv head, so the fold into v stays exact.
3. optional **clip search** (``clip=True``, default) for every linear except q/k: per output row and
   group, the clipping threshold ``max|w| · (1 - i/n_grid)``, ``i = 0 .. n_grid/2 - 1``, that minimises the
   group's output error on a sample of 512 calibration tokens.
4. **quantization**: group-wise asymmetric ``bits``-bit with a zero point (the AWQ GEMM format): per group
   ``scale = (max - min) / maxq`` (rounded to fp16), ``zero = clamp(-round(min / scale), 0, maxq)``.

The next layer receives the fp outputs of this layer (as in the paper's reference implementation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from adaptkit.errors import ConfigError

from adaptkit.quantize.api import QuantizedLinear, QuantSpec
from adaptkit.threads import single_thread

if TYPE_CHECKING:  # pragma: no cover
    import torch

N_GRID = 20
CLIP_SAMPLE_TOKENS = 512
CLIP_MAX_SHRINK = 0.5


# ---------------------------------------------------------------------------------------------------------
# the AWQ grid
# ---------------------------------------------------------------------------------------------------------
def awq_params(w: "torch.Tensor", bits: int, group_size: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Per (row, group) fp16-rounded scale and integer zero (as float) of ``w [out, in]``: ``[out, n_groups]``."""
    import torch

    from adaptkit_quant.rtn import fp16_round

    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    maxq = 2**bits - 1
    wg = w.reshape(out_f, in_f // gs, gs).to(torch.float32)
    mx = wg.amax(dim=2)
    mn = wg.amin(dim=2)
    scale = fp16_round((mx - mn).clamp(min=1e-5) / maxq)
    zero = torch.clamp(-torch.round(mn / scale), 0, maxq)
    return scale, zero


def awq_codes(w: "torch.Tensor", scale: "torch.Tensor", zero: "torch.Tensor", bits: int) -> "torch.Tensor":
    import torch

    out_f, in_f = w.shape
    ng = scale.shape[1]
    wg = w.reshape(out_f, ng, in_f // ng).to(torch.float32)
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, 2**bits - 1)
    return q.reshape(out_f, in_f)


def fake_quantize(w: "torch.Tensor", bits: int, group_size: int) -> "torch.Tensor":
    """``w`` quantized and dequantized on the AWQ grid (same dtype as w)."""
    scale, zero = awq_params(w, bits, group_size)
    q = awq_codes(w, scale, zero, bits)
    out_f, in_f = w.shape
    ng = scale.shape[1]
    deq = (q.reshape(out_f, ng, -1) - zero[..., None]) * scale[..., None]
    return deq.reshape(out_f, in_f).to(w.dtype)


def quantize_linear(w: "torch.Tensor", spec: QuantSpec) -> QuantizedLinear:
    """The final AWQ quantization of one (scaled, clipped) weight ``[out, in]``."""
    import torch

    out_f, in_f = w.shape
    gs = spec.effective_group_size(in_f)
    scale, zero = awq_params(w, spec.bits, gs)
    codes = awq_codes(w, scale, zero, spec.bits)
    return QuantizedLinear(
        codes=codes.to(torch.uint8).cpu(),
        scales=scale.T.contiguous().to(torch.float32).cpu(),
        zeros=zero.T.contiguous().round().to(torch.int32).cpu(),
        g_idx=(torch.arange(in_f) // gs).to(torch.int32),
        spec=QuantSpec(bits=spec.bits, group_size=spec.group_size, sym=False),
    )


# ---------------------------------------------------------------------------------------------------------
# scale groups of a Llama-style decoder layer
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ScaleGroup:
    """Linears sharing one input, the op producing it (``prev``), and the module whose output is compared."""

    prev: str  #: relative name of the producing op (a norm or a linear)
    linears: list[str]  #: relative names of the linears whose input columns are scaled
    inspect: str  #: relative name of the module run for the loss ("self_attn", "mlp" or a linear)
    kv_map: Any = None  #: for v->o with GQA: LongTensor [o_in] -> v output row; None when 1:1
    scales: Any = None  #: the chosen scales (per input channel of ``linears``)
    notes: list[str] = field(default_factory=list)


LLAMA_NAMES = {
    "norm1": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "o": "self_attn.o_proj", "norm2": "post_attention_layernorm", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def _check_norm(layer: Any, name: str, where: str) -> None:
    mod = layer.get_submodule(name)
    cls = type(mod).__name__
    if "Gemma" in cls or not hasattr(mod, "weight") or mod.weight is None:
        raise ConfigError(
            f"{where}.{name}: awq folds scales into the norm weight, which {cls} does not support "
            "(needs a norm that multiplies by its weight, like LlamaRMSNorm)"
        )


def scale_groups(layer: Any, config: Any, where: str = "layer") -> list[ScaleGroup]:
    """The four AWQ scale groups of a Llama-style layer (q/k/v, o, gate/up, down); ConfigError otherwise."""
    import torch

    names = {n for n, _ in layer.named_modules()}
    missing = [v for v in LLAMA_NAMES.values() if v not in names]
    if missing:
        raise ConfigError(
            f"{where}: awq needs Llama-style decoder layers ({', '.join(LLAMA_NAMES.values())}); "
            f"model_type {getattr(config, 'model_type', '?')!r} has no {missing[0]!r}"
        )
    _check_norm(layer, LLAMA_NAMES["norm1"], where)
    _check_norm(layer, LLAMA_NAMES["norm2"], where)
    n = LLAMA_NAMES
    groups = [ScaleGroup(n["norm1"], [n["q"], n["k"], n["v"]], "self_attn")]
    v = layer.get_submodule(n["v"])
    o = layer.get_submodule(n["o"])
    if v.out_features == o.in_features:
        groups.append(ScaleGroup(n["v"], [n["o"]], n["o"]))
    else:
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", heads) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        if o.in_features == heads * head_dim and v.out_features == kv_heads * head_dim and heads % kv_heads == 0:
            rep = heads // kv_heads
            c = torch.arange(o.in_features)
            kv_map = (c // head_dim // rep) * head_dim + c % head_dim
            groups.append(ScaleGroup(n["v"], [n["o"]], n["o"], kv_map=kv_map))
    groups.append(ScaleGroup(n["norm2"], [n["gate"], n["up"]], "mlp"))
    up = layer.get_submodule(n["up"])
    down = layer.get_submodule(n["down"])
    if up.out_features == down.in_features:
        groups.append(ScaleGroup(n["up"], [n["down"]], n["down"]))
    return groups


def tie_scales(scales: "torch.Tensor", kv_map: Any, n_kv: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(per-o-input scales, per-v-row scales) with the scales of channels sharing a v row averaged."""
    import torch

    kv = torch.zeros(n_kv, dtype=scales.dtype, device=scales.device)
    cnt = torch.zeros(n_kv, dtype=scales.dtype, device=scales.device)
    m = kv_map.to(scales.device)
    kv.index_add_(0, m, scales)
    cnt.index_add_(0, m, torch.ones_like(scales))
    kv = kv / cnt
    return kv[m], kv


def fold_scales(layer: Any, group: ScaleGroup, scales: "torch.Tensor") -> None:
    """Exact re-parametrisation: producing op ``/ s``, the linears' input columns ``* s`` (in place)."""
    import torch

    with torch.no_grad():
        s = scales.to(torch.float32)
        prev = layer.get_submodule(group.prev)
        if group.kv_map is not None:
            s_full, s_prev = tie_scales(s, group.kv_map, prev.out_features)
        else:
            s_full, s_prev = s, s
        if isinstance(prev, torch.nn.Linear):
            prev.weight.div_(s_prev.view(-1, 1).to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.div_(s_prev.to(prev.bias.dtype))
        else:
            prev.weight.div_(s_prev.to(prev.weight.dtype))
            if getattr(prev, "bias", None) is not None:
                prev.bias.div_(s_prev.to(prev.bias.dtype))
        for name in group.linears:
            lin = layer.get_submodule(name)
            lin.weight.mul_(s_full.view(1, -1).to(lin.weight.dtype))


# ---------------------------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------------------------
def weight_channel_mean(weights: list["torch.Tensor"], group_size: int) -> "torch.Tensor":
    """``w̄``: per input channel, the mean over rows of |W| / (its group's max |W|)."""
    import torch

    w = torch.cat([x.to(torch.float32) for x in weights], dim=0)
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    wg = w.abs().reshape(out_f, in_f // gs, gs)
    wg = wg / wg.amax(dim=2, keepdim=True).clamp(min=1e-12)
    return wg.reshape(out_f, in_f).mean(0)


def candidate_scales(x_mean: "torch.Tensor", w_mean: "torch.Tensor", n_grid: int, duo: bool) -> list[tuple[str, "torch.Tensor"]]:
    import torch

    out = [("1", torch.ones_like(x_mean))]
    for i in range(n_grid):
        a = i / n_grid
        if duo:
            s = x_mean.pow(a) / w_mean.pow(1 - a).clamp(min=1e-4)
        else:
            s = x_mean.pow(a)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        out.append((f"{a:.2f}", s))
    return out


def search_scales(
    linears: list[Any],
    inputs: list["torch.Tensor"],
    run: Callable[[int], "torch.Tensor"],
    *,
    bits: int,
    group_size: int,
    n_grid: int = N_GRID,
    duo_scaling: bool = True,
    kv_map: Any = None,
    n_kv: int = 0,
    ref: list["torch.Tensor"] | None = None,
) -> tuple["torch.Tensor", float, float, str]:
    """Best per-channel scales for ``linears`` (nn.Linear sharing the input ``inputs[b]``).

    ``run(b)`` computes the inspected block's output for batch ``b`` with the linears' *current* weights.
    ``ref``: the block's outputs with the original weights when the caller already has them (the layer's
    capture forward computed exactly these); else they are computed with ``run``.
    Returns ``(scales, best_loss, rtn_loss, best_label)``; weights are restored on return.
    """
    import torch

    originals = [lin.weight.detach().clone() for lin in linears]
    with torch.no_grad():
        if ref is None:
            ref = [run(b) for b in range(len(inputs))]
        x_sum = None
        n_tok = 0
        for x in inputs:
            xf = x.reshape(-1, x.shape[-1]).to(torch.float32)
            x_sum = xf.abs().sum(0) if x_sum is None else x_sum + xf.abs().sum(0)
            n_tok += xf.shape[0]
        x_mean = x_sum / max(1, n_tok)
        w_mean = weight_channel_mean(originals, group_size)
        best = (float("inf"), None, "")
        rtn_loss = float("nan")
        try:
            for label, s in candidate_scales(x_mean, w_mean, n_grid, duo_scaling):
                if kv_map is not None:
                    s, _ = tie_scales(s, kv_map, n_kv)
                with single_thread():
                    for lin, w0 in zip(linears, originals):
                        sd = s.to(w0.dtype).view(1, -1)
                        lin.weight.data = fake_quantize(w0 * sd, bits, group_size) / sd
                loss = 0.0
                count = 0
                for b in range(len(inputs)):
                    d = (run(b).to(torch.float32) - ref[b].to(torch.float32))
                    loss += float(d.pow(2).sum())
                    count += d.numel()
                loss /= max(1, count)
                if label == "1":
                    rtn_loss = loss
                if loss < best[0]:
                    best = (loss, s.clone(), label)
        finally:
            for lin, w0 in zip(linears, originals):
                lin.weight.data = w0
    return best[1], best[0], rtn_loss, best[2]


def search_clip(w: "torch.Tensor", x: "torch.Tensor", *, bits: int, group_size: int, n_grid: int = N_GRID,
                max_shrink: float = CLIP_MAX_SHRINK) -> "torch.Tensor":
    """Per (row, group) clipping threshold ``[out, n_groups]`` minimising the group output error on ``x [n, in]``.

    The group outputs ``x[:, g] · w[o, g]`` are batched matrix products over the groups."""
    import torch

    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    ng = in_f // gs
    n = x.shape[0]
    xg = x.to(torch.float32).reshape(n, ng, gs).permute(1, 0, 2).contiguous()  # [ng, n, gs]
    w32 = w.to(torch.float32)
    oc_batch = max(1, min(out_f, (1 << 25) // max(1, ng * n)))
    result = []
    for o0 in range(0, out_f, oc_batch):
        wb = w32[o0:o0 + oc_batch]
        oc = wb.shape[0]
        w3 = wb.reshape(oc, ng, gs)
        org_max = w3.abs().amax(dim=-1)  # [oc, ng]
        best_max = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        org_out = torch.bmm(xg, w3.permute(1, 2, 0))  # [ng, n, oc]
        for i_s in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i_s / n_grid)
            mv = max_val[..., None]
            cur = torch.maximum(torch.minimum(w3, mv), -mv)
            q = fake_quantize(cur.reshape(oc, in_f), bits, gs).reshape(oc, ng, gs)
            err = (torch.bmm(xg, q.permute(1, 2, 0)) - org_out).pow(2).mean(dim=1).T  # [oc, ng]
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_max = torch.where(better, max_val, best_max)
        result.append(best_max)
    return torch.cat(result, dim=0)


def apply_clip(lin: Any, max_val: "torch.Tensor", group_size: int) -> None:
    import torch

    with torch.no_grad():
        w = lin.weight
        out_f, in_f = w.shape
        ng = max_val.shape[1]
        wg = w.data.reshape(out_f, ng, in_f // ng)
        mv = max_val.to(w.dtype)[..., None]
        lin.weight.data = torch.clamp(wg, -mv, mv).reshape(out_f, in_f)


# ---------------------------------------------------------------------------------------------------------
# one layer
# ---------------------------------------------------------------------------------------------------------
def _capture(lw: Any, layer: Any, groups: list[ScaleGroup]) -> tuple[dict[str, list], list[dict[str, Any]], list,
                                                                     dict[str, list]]:
    """Inputs of each group's first linear and the attention kwargs, per batch; the layer's fp outputs; and
    the fp outputs of each group's inspected module (the references of the scale search: the same modules
    on the same input tensors with the same weights, so the same values a separate run computes)."""
    import torch

    feats: dict[str, list] = {g.linears[0]: [] for g in groups}
    refs: dict[str, list] = {g.inspect: [] for g in groups}
    attn_kw: list[dict[str, Any]] = []
    hooks = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_m: Any, inp: tuple[Any, ...], _out: Any) -> None:
            feats[name].append(inp[0].detach())

        return hook

    def make_ref_hook(name: str) -> Callable[..., None]:
        def hook(_m: Any, _inp: tuple[Any, ...], out: Any) -> None:
            out = out[0] if isinstance(out, (tuple, list)) else out
            refs[name].append(out.detach())

        return hook

    for name in feats:
        hooks.append(layer.get_submodule(name).register_forward_hook(make_hook(name)))
    for name in refs:
        hooks.append(layer.get_submodule(name).register_forward_hook(make_ref_hook(name)))

    def attn_pre(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kw = dict(kwargs)
        kw.pop("hidden_states", None)
        attn_kw.append(kw)

    hooks.append(layer.get_submodule("self_attn").register_forward_pre_hook(attn_pre, with_kwargs=True))
    outs = []
    try:
        with torch.no_grad():
            for h, kw in zip(lw.inps, lw.kwargs):
                outs.append(lw.forward_layer(layer, h, kw))
    finally:
        for hk in hooks:
            hk.remove()
    n = len(outs)
    refs = {k: v for k, v in refs.items() if len(v) == n}  # a module called more than once per forward: recompute
    return feats, attn_kw, outs, refs


def awq_layer(
    lw: Any, idx: int, layer: Any, spec: QuantSpec, *, n_grid: int = N_GRID, duo_scaling: bool = True,
    clip: bool = True, report: Callable[[str], None] = lambda m: None, targets: set[str] | None = None,
) -> tuple[list[ScaleGroup], list]:
    """Search, fold and clip layer ``idx`` in place (weights are NOT quantized yet).

    Returns the scale groups (with their chosen ``scales``) and the layer's fp outputs (the next inputs)."""
    import torch

    where = lw.layer_prefix(idx)
    groups = scale_groups(layer, lw.config, where)
    if targets is not None:
        # a group is only folded when every linear it touches is quantized (and so re-written)
        def ok(g: ScaleGroup) -> bool:
            touched = list(g.linears) + ([g.prev] if isinstance(layer.get_submodule(g.prev), torch.nn.Linear) else [])
            return all(f"{where}.{n}" in targets for n in touched)

        groups = [g for g in groups if ok(g)]
    with lw.timed("forward"):
        feats, attn_kw, outs, refs = _capture(lw, layer, groups)
    gs = spec.group_size
    for g in groups:
        lins = [layer.get_submodule(n) for n in g.linears]
        xs = feats[g.linears[0]]
        mod = layer.get_submodule(g.inspect)
        if g.inspect == "self_attn":
            def run(b: int, mod: Any = mod, xs: list = xs) -> "torch.Tensor":
                out = mod(hidden_states=xs[b], **attn_kw[b])
                return out[0] if isinstance(out, (tuple, list)) else out
        else:
            def run(b: int, mod: Any = mod, xs: list = xs) -> "torch.Tensor":
                return mod(xs[b])
        n_kv = layer.get_submodule(g.prev).out_features if g.kv_map is not None else 0
        with lw.timed("search_scales"):
            s, loss, rtn_loss, label = search_scales(
                lins, xs, run, bits=spec.bits, group_size=gs, n_grid=n_grid, duo_scaling=duo_scaling,
                kv_map=g.kv_map, n_kv=n_kv, ref=refs.pop(g.inspect, None),
            )
        g.scales = s
        fold_scales(layer, g, s)
        if g.kv_map is not None:
            s_in, _ = tie_scales(s, g.kv_map, n_kv)
        else:
            s_in = s
        feats[g.linears[0]] = [x / s_in.to(x.dtype) for x in xs]
        short = "/".join(n.rsplit(".", 1)[-1].replace("_proj", "") for n in g.linears)
        gain = (1 - loss / rtn_loss) * 100 if rtn_loss and rtn_loss == rtn_loss and rtn_loss > 0 else 0.0
        report(f"layer {idx + 1}/{lw.num_layers} awq {short}: alpha={label} loss={loss:.3e} (rtn {rtn_loss:.3e}, -{gain:.1f}%)")
    if clip:
        for g in groups:
            xs = feats[g.linears[0]]
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs], dim=0)
            step = max(1, x.shape[0] // CLIP_SAMPLE_TOKENS)
            x = x[::step][:CLIP_SAMPLE_TOKENS]
            for name in g.linears:
                if name.endswith(("q_proj", "k_proj")):
                    continue
                lin = layer.get_submodule(name)
                with lw.timed("search_clip"):
                    mv = search_clip(lin.weight.detach(), x, bits=spec.bits, group_size=gs, n_grid=n_grid)
                    apply_clip(lin, mv, gs)
    return groups, outs


def quantize(request: Any) -> Iterator[tuple[str, Any]]:
    """The ``awq`` quantizer: yields per layer the replaced norm weights / biases, then the QuantizedLinears."""
    import torch

    from adaptkit_quant.layerwise import LayerwiseModel

    spec: QuantSpec = request.spec
    opts = request.options or {}
    n_grid = int(opts.get("n_grid", opts.get("grid", N_GRID)))
    duo = bool(opts.get("duo_scaling", True))
    clip = bool(opts.get("clip", True))
    if spec.act_order:
        raise ConfigError("--act-order is a GPTQ option; awq does not reorder columns")
    lw = LayerwiseModel.from_request(request)
    targets = set(request.targets)
    done: set[str] = set()
    try:
        for idx in range(lw.num_layers):
            layer = lw.load_layer(idx)
            pre = lw.layer_prefix(idx)
            groups, outs = awq_layer(
                lw, idx, layer, spec, n_grid=n_grid, duo_scaling=duo, clip=clip, report=request.report, targets=targets
            )
            ckpt_names = set(lw.checkpoint.names())
            for g in groups:
                prev = layer.get_submodule(g.prev)
                pnames = ("bias",) if isinstance(prev, torch.nn.Linear) else ("weight", "bias")
                for pname in pnames:
                    full = f"{pre}.{g.prev}.{pname}"
                    if getattr(prev, pname, None) is not None and full in ckpt_names:
                        yield full, getattr(prev, pname).detach().cpu()
            for name in lw.linear_names(idx):
                if name not in targets:
                    continue
                mod = lw.modules(idx)[name]
                with lw.timed("codes"), single_thread():
                    item = quantize_linear(mod.weight.detach(), spec)
                yield name, item
                done.add(name)
            lw.inps = outs
            lw.unload_layer(idx)
    finally:
        lw.close()
    missing = [t for t in request.targets if t not in done]
    if missing:
        raise ConfigError(f"awq can only quantize linear layers inside the decoder layers; {missing[0]!r} is outside them")
