"""AWQ: the folding is an exact re-parametrisation (logits of the transformers model unchanged, GQA
included), the scale search lowers the block output error below RTN, the grid matches the paper's
formula written here, and the quantizer streams the tiny Llama."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from adaptkit.errors import ConfigError  # noqa: E402
from adaptkit.io import open_checkpoint  # noqa: E402
from adaptkit_quant import awq  # noqa: E402
from adaptkit.quantize.api import QuantizeRequest, QuantSpec  # noqa: E402


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa").eval()


def ref_awq_fake_quant(w: torch.Tensor, bits: int, gs: int) -> torch.Tensor:
    """Group-wise asymmetric min/max quantization with zero point, written from the AWQ paper / GEMM format."""
    maxq = 2**bits - 1
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for g0 in range(0, w.shape[1], gs):
            x = w[r, g0:g0 + gs].double()
            s = float(torch.tensor(max(float(x.max() - x.min()), 1e-5) / maxq).half())
            z = min(max(-round(float(x.min()) / s), 0), maxq)
            q = torch.clamp(torch.round(x / s) + z, 0, maxq)
            out[r, g0:g0 + gs] = ((q - z) * s).to(w.dtype)
    return out


def test_awq_grid_matches_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g) * torch.exp(torch.randn(6, 1, generator=g))
    w[0, :32] = w[0, :32].abs()  # a group with min > 0
    ours = awq.fake_quantize(w, 4, 32)
    assert torch.allclose(ours, ref_awq_fake_quant(w, 4, 32), atol=1e-6)
    ql = awq.quantize_linear(w, QuantSpec(bits=4, group_size=32, sym=False))
    ql.validate("w")
    assert torch.allclose(ql.dequantize(), ours, atol=1e-6)


@pytest.mark.parametrize("opts", [dict(), dict(num_kv_heads=4), dict(attention_bias=True, mlp_bias=True)])
def test_folding_preserves_the_fp_function(tiny_llama, opts):
    path = tiny_llama(**opts)
    model = _hf_model(path)
    ref_model = _hf_model(path)
    g = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        groups = awq.scale_groups(layer, model.config)
        assert len(groups) == 4  # q/k/v, v->o (tied scales under GQA), gate/up, down
        for grp in groups:
            n_in = layer.get_submodule(grp.linears[0]).in_features
            s = torch.exp(torch.randn(n_in, generator=g))
            awq.fold_scales(layer, grp, s)
    ids = torch.randint(0, 500, (2, 32), generator=g)
    with torch.no_grad():
        a = ref_model(input_ids=ids).logits
        b = model(input_ids=ids).logits
    # the weights really changed ...
    assert not torch.allclose(model.model.layers[0].mlp.down_proj.weight, ref_model.model.layers[0].mlp.down_proj.weight)
    # ... and the function did not
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), float((a - b).abs().max())


def test_scale_search_beats_rtn_with_outlier_channels():
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 128, generator=g) * 0.05)
    ch = torch.ones(128)
    ch[torch.randperm(128, generator=g)[:6]] = 30.0  # a few salient input channels, as in LLM activations
    xs = [torch.randn(256, 128, generator=g) * ch for _ in range(2)]
    w0 = lin.weight.detach().clone()
    s, best, rtn_loss, label = awq.search_scales([lin], xs, lambda b: lin(xs[b]), bits=4, group_size=32)
    assert torch.equal(lin.weight, w0)  # restored
    # independent RTN error of the block
    w_rtn = ref_awq_fake_quant(w0, 4, 32)
    e_rtn = sum(float(((x @ w0.T) - (x @ w_rtn.T)).pow(2).sum()) for x in xs) / (2 * 256 * 64)
    assert rtn_loss == pytest.approx(e_rtn, rel=1e-4)
    assert best < 0.7 * e_rtn and label != "1"
    # the chosen scales, applied as Q(W*s)/s, reproduce the reported loss
    w_awq = ref_awq_fake_quant(w0 * s, 4, 32) / s
    e_awq = sum(float(((x @ w0.T) - (x @ w_awq.T)).pow(2).sum()) for x in xs) / (2 * 256 * 64)
    assert best == pytest.approx(e_awq, rel=1e-3)


def test_clip_search_never_increases_group_error():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 64, generator=g)
    w[:, 5] *= 8  # heavy tails
    x = torch.randn(512, 64, generator=g)
    mv = awq.search_clip(w, x, bits=4, group_size=32)
    lin = torch.nn.Linear(64, 64, bias=False)
    lin.weight.data = w.clone()
    awq.apply_clip(lin, mv, 32)
    e_clip = float(((x @ w.T) - x @ awq.fake_quantize(lin.weight.data, 4, 32).T).pow(2).mean())
    e_none = float(((x @ w.T) - x @ awq.fake_quantize(w, 4, 32).T).pow(2).mean())
    assert e_clip <= e_none and bool((mv < w.abs().reshape(64, 2, 32).amax(-1)).any())


def test_awq_quantizer_on_tiny_llama(tiny_llama):
    from adaptkit.quantize.runner import find_targets

    path = tiny_llama()
    spec = QuantSpec(bits=4, group_size=32, sym=False)
    lines = []
    with open_checkpoint(path) as ckpt:
        req = QuantizeRequest(model_dir=path, out_dir=path.parent / "x", method="awq", spec=spec, nsamples=8, seqlen=64,
                              targets=tuple(find_targets(ckpt)), checkpoint=ckpt, config=ckpt.config,
                              progress=lines.append, options={"n_grid": 10})
        items = list(awq.quantize(req))
    names = [n for n, _ in items]
    assert sorted(n for n, it in items if hasattr(it, "codes")) == sorted(req.targets)
    assert "model.layers.0.input_layernorm.weight" in names and "model.layers.1.post_attention_layernorm.weight" in names
    assert any("awq q/k/v" in line for line in lines)
    # scale + quantized weights together still compute (approximately) the same function
    model = _hf_model(path)
    base = _hf_model(path)
    sd = model.state_dict()
    with torch.no_grad():
        for n, it in items:
            if hasattr(it, "codes"):
                it.validate(n)
                sd[n + ".weight"].copy_(it.dequantize())
            else:
                sd[n].copy_(it)
    ids = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = base(input_ids=ids).logits, model(input_ids=ids).logits
    rel = float((a - b).norm() / a.norm())
    assert rel < 0.2, rel


def test_awq_rejects_act_order_and_non_llama_layers(tiny_llama):
    spec = QuantSpec(bits=4, group_size=32, act_order=True)
    req = QuantizeRequest(model_dir=tiny_llama(), out_dir=None, method="awq", spec=spec)
    with pytest.raises(ConfigError, match="act-order"):
        list(awq.quantize(req))
    layer = torch.nn.Module()
    layer.mlp = torch.nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="Llama-style"):
        awq.scale_groups(layer, type("C", (), {"model_type": "weird"})(), "model.layers.0")
