"""Bit packing shared by the GPTQ and AWQ formats (torch, vectorised).

``pack_bitstream(values, bits)`` packs integers ``0 .. 2**bits-1`` along the LAST dimension into int32 words as
one little-endian bit stream: value ``j`` occupies bits ``j*bits .. j*bits+bits-1`` of the stream, bit ``k`` of
the stream is bit ``k % 32`` of word ``k // 32``. For 2/4/8 bits this is ``32/bits`` values per word, LSB
first; for 3 bits 32 values fill 3 words and values 10 and 21 straddle word boundaries -- exactly the layout
AutoGPTQ / GPTQModel write for GPTQ v1 (``qweight`` along input features, ``qzeros`` along output features).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

_MASK32 = 0xFFFFFFFF


def unit(bits: int) -> tuple[int, int]:
    """(values, words) of the smallest whole-word packing unit: (8, 1) for 4 bits, (32, 3) for 3 bits."""
    lcm = bits * 32 // math.gcd(bits, 32)
    return lcm // bits, lcm // 32


def _layout(bits: int) -> tuple[list[int], list[int], list[bool]]:
    """For each value j of a unit: (word index, bit offset, spills into the next word)."""
    nv, _ = unit(bits)
    words, offs, spill = [], [], []
    for j in range(nv):
        w, off = divmod(j * bits, 32)
        words.append(w)
        offs.append(off)
        spill.append(off + bits > 32)
    return words, offs, spill


def _low32_as_int32(words: "torch.Tensor") -> "torch.Tensor":
    """int64 tensor -> its low 32 bits as int32 (two's complement), exactly."""
    import torch

    w = words.contiguous()
    return w.view(torch.int32)[..., 0::2].contiguous() if w.numel() else w.to(torch.int32)


def pack_bitstream(values: "torch.Tensor", bits: int) -> "torch.Tensor":
    import torch

    n = values.shape[-1]
    nv, nw = unit(bits)
    if n % nv:
        raise ValueError(f"cannot pack {n} values of {bits} bits into whole int32 words (need a multiple of {nv})")
    v = values.to(torch.int64)
    if v.numel():
        lo, hi = torch.aminmax(v)
    if v.numel() and (int(lo) < 0 or int(hi) >= 2**bits):
        raise ValueError(f"values outside 0..{2**bits - 1} cannot be packed in {bits} bits")
    lead = v.shape[:-1]
    v = v.reshape(*lead, n // nv, nv)
    widx, offs, spill = _layout(bits)
    dev = v.device
    shifted = v << torch.tensor(offs, dtype=torch.int64, device=dev)  # bits beyond 32 are cut below
    if nw == 1:  # 2/4/8 bits: every value of the unit lands in one word
        return _low32_as_int32(shifted.sum(-1))
    parts = []
    for w in range(nw):
        sel = [j for j in range(nv) if widx[j] == w]
        word = shifted[..., sel].sum(-1) if len(sel) > 1 else shifted[..., sel[0]]  # disjoint bits: sum == or
        carry = [j for j in range(nv) if spill[j] and widx[j] + 1 == w]
        for j in carry:
            word = word + (v[..., j] >> (32 - offs[j]))
        parts.append(word)
    words = torch.stack(parts, dim=-1) if nw > 1 else parts[0].unsqueeze(-1)
    return _low32_as_int32(words.reshape(*lead, (n // nv) * nw))


def unpack_bitstream(words: "torch.Tensor", bits: int, n: int | None = None) -> "torch.Tensor":
    """Inverse of :func:`pack_bitstream`: int32 ``[..., W]`` -> int32 ``[..., W*32/bits]`` (or the first ``n``)."""
    import torch

    nv, nw = unit(bits)
    m = words.shape[-1]
    if m % nw:
        raise ValueError(f"{m} int32 words do not hold whole {bits}-bit units (need a multiple of {nw})")
    lead = words.shape[:-1]
    dev = words.device
    w64 = (words.to(torch.int64) & _MASK32).reshape(*lead, m // nw, nw)
    widx, offs, spill = _layout(bits)
    base = w64.index_select(-1, torch.tensor(widx, device=dev)) >> torch.tensor(offs, dtype=torch.int64, device=dev)
    if any(spill):
        js = [j for j in range(nv) if spill[j]]
        hi = w64.index_select(-1, torch.tensor([widx[j] + 1 for j in js], device=dev))
        hi = hi << torch.tensor([32 - offs[j] for j in js], dtype=torch.int64, device=dev)
        base[..., js] = base[..., js] | hi
    out = (base & (2**bits - 1)).reshape(*lead, (m // nw) * nv).to(torch.int32)
    return out if n is None else out[..., :n]


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble ``i`` of an AWQ GEMM word holds column ``8*c + AWQ_ORDER[i]``."""


def pack_awq(values: "torch.Tensor") -> "torch.Tensor":
    """4-bit values ``[..., N]`` (N % 8 == 0) -> int32 ``[..., N/8]`` in AWQ's interleaved nibble order."""
    import torch

    n = values.shape[-1]
    if n % 8:
        raise ValueError(f"AWQ packs 8 values per int32 word; {n} is not a multiple of 8")
    order = torch.tensor(AWQ_ORDER, device=values.device)
    v = values.reshape(*values.shape[:-1], n // 8, 8).index_select(-1, order).reshape(values.shape)
    return pack_bitstream(v, 4)


def unpack_awq(words: "torch.Tensor") -> "torch.Tensor":
    import torch

    v = unpack_bitstream(words, 4)
    n = v.shape[-1]
    inv = torch.argsort(torch.tensor(AWQ_ORDER, device=words.device))
    return v.reshape(*v.shape[:-1], n // 8, 8).index_select(-1, inv).reshape(v.shape)
