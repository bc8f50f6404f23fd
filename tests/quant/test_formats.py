"""GPTQ v1 / AWQ GEMM packing against independent bit-twiddling references written here (Python ints)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from adaptkit.quantize.api import QuantizedLinear, QuantSpec  # noqa: E402
from adaptkit.formats import awq, gptq  # noqa: E402
from adaptkit.formats.packing import pack_bitstream, unpack_bitstream  # noqa: E402


def _ref_pack_rows(values: list[list[int]], bits: int) -> list[list[int]]:
    """Each row -> int32 words: one big little-endian integer, value j at bit j*bits, cut into 32-bit words."""
    out = []
    for row in values:
        big = 0
        for j, v in enumerate(row):
            assert 0 <= v < 2**bits
            big |= v << (j * bits)
        nwords = len(row) * bits // 32
        words = []
        for w in range(nwords):
            u = (big >> (32 * w)) & 0xFFFFFFFF
            words.append(u - 2**32 if u >= 2**31 else u)  # two's-complement int32, as stored
        out.append(words)
    return out


def _ref_awq_row(row: list[int]) -> list[int]:
    """AutoAWQ GEMM: word c, nibble i holds column 8c + [0,2,4,6,1,3,5,7][i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    words = []
    for c in range(len(row) // 8):
        u = 0
        for i in range(8):
            u |= row[8 * c + order[i]] << (4 * i)
        words.append(u - 2**32 if u >= 2**31 else u)
    return words


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bitstream_matches_reference_and_round_trips(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    n = 96 if bits == 3 else 64
    vals = torch.randint(0, 2**bits, (5, n), generator=g)
    vals[0] = 2**bits - 1  # all ones: sign bit of the int32 words set
    packed = pack_bitstream(vals, bits)
    assert packed.dtype == torch.int32
    assert packed.tolist() == _ref_pack_rows(vals.tolist(), bits)
    assert torch.equal(unpack_bitstream(packed, bits).long(), vals)


def test_three_bit_word_boundaries_explicit() -> None:
    # value 10 spans word0 bits 30-31 and word1 bit 0; value 21 spans word1 bit 31 and word2 bits 0-1
    vals = torch.zeros(1, 32, dtype=torch.int64)
    vals[0, 10] = 0b111
    vals[0, 21] = 0b101
    w = [x & 0xFFFFFFFF for x in pack_bitstream(vals, 3)[0].tolist()]
    assert w[0] == 0b11 << 30
    assert w[1] == (0b1 | (0b1 << 31))
    assert w[2] == 0b10


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_pack_layout(bits: int) -> None:
    out_f, in_f, gs = 64, 128, 32
    g = torch.Generator().manual_seed(100 + bits)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.int32)
    zeros = torch.randint(1, 2**bits, (in_f // gs, out_f), generator=g, dtype=torch.int32)
    scales = torch.rand(in_f // gs, out_f, generator=g) * 0.01 + 1e-3
    g_idx = torch.arange(in_f, dtype=torch.int32) // gs
    q = QuantizedLinear(codes, scales, zeros, g_idx, QuantSpec(bits=bits, group_size=gs, sym=False))
    t = gptq.pack(q)
    assert t["qweight"].shape == (in_f * bits // 32, out_f) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (in_f // gs, out_f * bits // 32)
    # qweight: packed along INPUT features -> reference packs each output column's codes, then transposes
    ref_qw = _ref_pack_rows(codes.tolist(), bits)  # row o: codes[o, :] along inputs
    assert t["qweight"].T.tolist() == ref_qw
    # qzeros: zero - 1 (v1) packed along OUTPUT features
    assert t["qzeros"].tolist() == _ref_pack_rows((zeros - 1).tolist(), bits)
    assert t["scales"].dtype == torch.float16
    back = gptq.unpack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, group_size=gs, sym=False)
    assert torch.equal(back.codes, codes) and torch.equal(back.zeros, zeros)
    assert torch.equal(back.scales, scales.half().float())


def test_gptq_v1_refuses_zero_point_zero() -> None:
    codes = torch.zeros(8, 32, dtype=torch.int32)
    q = QuantizedLinear(codes, torch.ones(1, 8), torch.zeros(1, 8, dtype=torch.int32),
                        torch.zeros(32, dtype=torch.int32), QuantSpec(bits=4, group_size=-1, sym=False))
    q.validate("m")  # a zero point of 0 is a valid grid ...
    with pytest.raises(ValueError, match="zero point of 0"):
        gptq.pack(q)  # ... that GPTQ v1 (zero - 1 stored) cannot represent


def test_awq_pack_layout_and_round_trip() -> None:
    out_f, in_f, gs = 48, 64, 32
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (in_f // gs, out_f), generator=g, dtype=torch.int32)
    scales = torch.rand(in_f // gs, out_f, generator=g) + 0.1
    g_idx = torch.arange(in_f, dtype=torch.int32) // gs
    q = QuantizedLinear(codes, scales, zeros, g_idx, QuantSpec(bits=4, group_size=gs, sym=False))
    t = awq.pack(q)
    assert t["qweight"].shape == (in_f, out_f // 8)
    # row i of qweight packs codes[:, i] (all outputs of input i) in AWQ order
    assert t["qweight"].tolist() == [_ref_awq_row(r) for r in codes.T.tolist()]
    assert t["qzeros"].tolist() == [_ref_awq_row(r) for r in zeros.tolist()]  # zeros stored as is (not -1)
    back = awq.unpack(t["qweight"], t["qzeros"], t["scales"], group_size=gs)
    assert torch.equal(back.codes, codes) and torch.equal(back.zeros, zeros)
    # dequantized weights: float64 formula written here
    w_ref = torch.empty(out_f, in_f, dtype=torch.float64)
    s16 = scales.half().double()
    for i in range(in_f):
        w_ref[:, i] = (codes[:, i].double() - zeros[i // gs].double()) * s16[i // gs]
    assert torch.allclose(back.dequantize().double(), w_ref, rtol=0, atol=1e-6)


def test_awq_refuses_act_order_groups() -> None:
    codes = torch.zeros(8, 64, dtype=torch.int32)
    g_idx = torch.randperm(64, generator=torch.Generator().manual_seed(0)).to(torch.int32) // 32
    q = QuantizedLinear(codes, torch.ones(2, 8), torch.ones(2, 8, dtype=torch.int32), g_idx,
                        QuantSpec(bits=4, group_size=32, sym=False))
    with pytest.raises(ValueError, match="g_idx"):
        awq.pack(q)


@pytest.mark.parametrize(
    "shape,spec,msg",
    [
        ((64, 96), QuantSpec(bits=4, group_size=64), "multiple of group size"),
        ((64, 64), QuantSpec(bits=5, group_size=32), "not 5"),
        ((36, 64), QuantSpec(bits=3, group_size=32), "out_features 36"),
        ((40, 64), QuantSpec(bits=4, group_size=32), "out_features 40 is not a multiple of 32"),
        ((64, 48), QuantSpec(bits=8, group_size=-1), "in_features 48 is not a multiple of 32"),
    ],
)
def test_gptq_shape_problems(shape, spec, msg) -> None:
    assert msg in gptq.shape_problem(*shape, spec)


def test_gptq_quantization_config_is_v1() -> None:
    cfg = gptq.quantization_config(QuantSpec(bits=3, group_size=64, sym=False, act_order=True, damp=0.02), method="gptq")
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq"
    assert (cfg["bits"], cfg["group_size"], cfg["desc_act"], cfg["sym"], cfg["damp_percent"]) == (3, 64, True, False, 0.02)
    assert cfg["static_groups"] is False and cfg["true_sequential"] is True
