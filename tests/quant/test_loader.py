"""Our GPTQ v1 / AWQ outputs load back through the ``quantized`` loader with the weights a v1 reader
reconstructs (unpacked here with an independent Python-int bit reader), and --method dequantize writes them."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from adaptkit.quantize.api import QuantSpec  # noqa: E402
from adaptkit.quantize.runner import run_dequantize, run_quantize  # noqa: E402
from adaptkit.registry import Quantizer  # noqa: E402
from adaptkit_quant.rtn import quantize_weight  # noqa: E402


def _quantizer(fn, fmt: str = "gptq") -> Quantizer:
    """An in-process quantizer around ``fn`` (what a third-party plugin would register)."""
    return Quantizer(name=fn.__name__.replace("_", "-"), impl=fn, formats=(fmt,), bits=(2, 3, 4, 8) if fmt == "gptq" else (4,),
                     accepts=("bits", "group_size", "sym"))


def _unpack_ref(words: list[int], bits: int, n: int) -> list[int]:
    big = 0
    for k, w in enumerate(words):
        big |= (w & 0xFFFFFFFF) << (32 * k)
    return [(big >> (j * bits)) & (2**bits - 1) for j in range(n)]


def _dequant_gptq_v1_ref(raw, module: str, bits: int) -> "torch.Tensor":
    qweight = raw.get_tensor(f"{module}.qweight")  # [in*bits/32, out]
    qzeros = raw.get_tensor(f"{module}.qzeros")
    scales = raw.get_tensor(f"{module}.scales").double()
    g_idx = raw.get_tensor(f"{module}.g_idx").tolist()
    n_words, out_f = qweight.shape
    in_f = n_words * 32 // bits
    codes = [_unpack_ref(qweight[:, o].tolist(), bits, in_f) for o in range(out_f)]
    zeros = [[z + 1 for z in _unpack_ref(row, bits, out_f)] for row in qzeros.tolist()]  # v1: stored zero-1
    w = torch.empty(out_f, in_f, dtype=torch.float64)
    for o in range(out_f):
        for i in range(in_f):
            g = g_idx[i]
            w[o, i] = (codes[o][i] - zeros[g][o]) * scales[g, o]
    return w


@pytest.mark.parametrize("bits,sym", [(3, False), (4, True)])
def test_gptq_output_loads_back(tiny_llama, tmp_path, adaptkit_pm, bits, sym) -> None:
    from adaptkit.io import open_checkpoint
    from safetensors import safe_open

    src = tiny_llama(attention_bias=True)
    out = tmp_path / "q"
    res = run_quantize(src, out, method="rtn", bits=bits, group_size=32, sym=sym, host=adaptkit_pm)
    assert res.format == "gptq" and len(res.quantized) == 14
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (cfg["quant_method"], cfg["checkpoint_format"], cfg["bits"], cfg["sym"]) == ("gptq", "gptq", bits, sym)

    orig = open_checkpoint(src)
    qc = adaptkit_pm.open_model(out)
    assert type(qc).__name__ == "QuantizedCheckpoint"
    assert qc.names() == orig.names() or sorted(qc.names()) == sorted(orig.names())
    assert "quantization_config" not in qc.config
    with safe_open(str(out / "model.safetensors"), "pt") as raw:
        m = "model.layers.1.self_attn.k_proj"  # k_proj: [32, 64], with bias
        ref = _dequant_gptq_v1_ref(raw, m, bits)
        got = qc.get(m + ".weight").double()
        assert torch.equal(got, ref.float().double())
        assert torch.equal(raw.get_tensor(m + ".bias"), orig.get(m + ".bias"))
    for name in orig.names():
        if name.endswith(".weight") and ".layers." in name and len(orig.info(name).shape) == 2:
            w_hat = quantize_weight(orig.get(name), QuantSpec(bits=bits, group_size=32, sym=sym)).dequantize()
            assert torch.equal(qc.get(name), w_hat.to(qc.get(name).dtype)), name
            # and the RTN error is bounded by the grid (sanity of what was stored)
            assert float((qc.get(name) - orig.get(name)).abs().max()) < float(orig.get(name).abs().max())
        else:
            assert torch.equal(qc.get(name), orig.get(name)), name
    qc.close()
    orig.close()


def test_dequantize_command_writes_float_model(tiny_llama, tmp_path, adaptkit_pm) -> None:
    from adaptkit.io import open_checkpoint

    src = tiny_llama()
    q = tmp_path / "q"
    run_quantize(src, q, method="rtn", bits=4, group_size=32, host=adaptkit_pm)
    d = tmp_path / "d"
    res = run_dequantize(q, d, host=adaptkit_pm)
    assert res.format == "float"
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg and not (d / "quantize_config.json").exists()
    qc = adaptkit_pm.open_model(q)
    with open_checkpoint(d) as ck:
        assert sorted(ck.names()) == sorted(qc.names())
        for n in ck.names():
            assert torch.equal(ck.get(n), qc.get(n)), n
    # the dequantized model quantizes again (it is a plain model now)
    run_quantize(d, tmp_path / "q2", method="rtn", bits=4, group_size=32, host=adaptkit_pm, show_progress=False)


def test_awq_writer_and_loader(tiny_llama, tmp_path, adaptkit_pm) -> None:
    """The AWQ GEMM writer, fed by a stand-in algorithm (RTN asym, contiguous groups)."""
    from adaptkit.io import open_checkpoint

    src = tiny_llama()
    spec = QuantSpec(bits=4, group_size=32, sym=False)

    def fake_awq(request):
        for m in request.targets:
            yield m, quantize_weight(request.weight(m), request.spec)

    out = tmp_path / "awq"
    res = run_quantize(src, out, quantizer=_quantizer(fake_awq, "awq"), bits=4, group_size=32, sym=False,
                       host=adaptkit_pm)
    assert res.format == "awq"
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "awq", "version": "gemm", "zero_point": True, "bits": 4, "group_size": 32,
                   "modules_to_not_convert": None}
    qc = adaptkit_pm.open_model(out)
    with open_checkpoint(src) as orig:
        raw = qc.raw
        m = "model.layers.0.mlp.down_proj"  # [64, 128]
        qw = raw.get(m + ".qweight")
        assert tuple(qw.shape) == (128, 8)
        # independent AWQ reader: nibble i of word c is output column 8c + [0,2,4,6,1,3,5,7][i]
        order = [0, 2, 4, 6, 1, 3, 5, 7]
        qz = raw.get(m + ".qzeros").tolist()
        sc = raw.get(m + ".scales").double()
        ref = torch.empty(64, 128, dtype=torch.float64)
        for i, row in enumerate(qw.tolist()):
            for c, word in enumerate(row):
                for k in range(8):
                    o = 8 * c + order[k]
                    code = ((word & 0xFFFFFFFF) >> (4 * k)) & 0xF
                    zero = ((qz[i // 32][c] & 0xFFFFFFFF) >> (4 * k)) & 0xF
                    ref[o, i] = (code - zero) * sc[i // 32, o]
        assert torch.equal(qc.get(m + ".weight").double(), ref.float().double())
        w_hat = quantize_weight(orig.get(m + ".weight"), spec).dequantize()
        assert torch.equal(qc.get(m + ".weight"), w_hat)
    qc.close()


def test_failing_quantizer_leaves_nothing(tiny_llama, tmp_path, adaptkit_pm) -> None:
    from adaptkit.errors import AdaptkitError

    src = tiny_llama()

    def dies_midway(request):
        for k, m in enumerate(request.targets):
            if k == 5:
                raise RuntimeError("boom")
            yield m, quantize_weight(request.weight(m), request.spec)

    def forgets_one(request):
        for m in request.targets[1:]:
            yield m, quantize_weight(request.weight(m), request.spec)

    def bad_zero(request):
        for m in request.targets:
            q = quantize_weight(request.weight(m), request.spec)
            q.zeros[:] = 0
            yield m, q

    for impl, exc, msg in [(dies_midway, RuntimeError, "boom"), (forgets_one, AdaptkitError, "did not quantize"),
                           (bad_zero, AdaptkitError, "zero points outside 1..15")]:
        out = tmp_path / impl.__name__
        with pytest.raises(exc, match=msg):
            run_quantize(src, out, quantizer=_quantizer(impl), group_size=32, sym=False, host=adaptkit_pm)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))


def test_sharded_output_and_nf4_dequantize(tiny_llama, tmp_path, adaptkit_pm) -> None:
    from adaptkit.io import open_checkpoint

    src = tiny_llama(dtype="bfloat16")
    q = tmp_path / "q"
    run_quantize(src, q, method="rtn", bits=8, group_size=-1, host=adaptkit_pm, max_shard_size=40_000)
    assert (q / "model.safetensors.index.json").exists()
    qc = adaptkit_pm.open_model(q)
    assert qc.info("model.layers.0.mlp.up_proj.weight").dtype == "BF16"  # the config's dtype
    with open_checkpoint(src) as orig:
        w = orig.get("model.layers.0.mlp.up_proj.weight")
        w_hat = quantize_weight(w, QuantSpec(bits=8, group_size=-1, sym=True)).dequantize().to(torch.bfloat16)
        assert torch.equal(qc.get("model.layers.0.mlp.up_proj.weight"), w_hat)
    qc.close()

    n = tmp_path / "n"
    run_quantize(src, n, method="nf4", host=adaptkit_pm)
    d = tmp_path / "d"
    run_dequantize(n, d, host=adaptkit_pm)
    qn = adaptkit_pm.open_model(n)
    with open_checkpoint(d) as ck, open_checkpoint(src) as orig:
        assert sorted(ck.names()) == sorted(orig.names())
        for name in ck.names():
            assert ck.info(name).dtype == orig.info(name).dtype == "BF16"
            assert torch.equal(ck.get(name), qn.get(name))
    qn.close()
