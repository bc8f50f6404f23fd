"""NF4 quantization (QLoRA's 4-bit NormalFloat with blockwise absmax), the ``nf4`` quantizer.

Algorithm: flatten ``W``; per block of ``blocksize`` values ``absmax = max|w|``; ``x = w * (1/absmax)`` clamped
to [-1, 1]; code = index of the nearest NF4 value (ties to the lower code: thresholds are the midpoints
between neighbouring code values, ``x <= midpoint`` picks the lower one) -- what bitsandbytes' kernels do.
The quantizer yields a :class:`adaptkit.quantize.api.BlockwiseQuantized` per target; the core ``bnb-nf4``
format (:mod:`adaptkit.formats.nf4`) packs the codes, double-quantizes ``absmax`` (``-o double_quant``,
``-o absmax_rounding``) and writes the layout transformers + bitsandbytes load.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from adaptkit.formats import nf4 as fmt
from adaptkit.quantize.api import BlockwiseQuantized, QuantizeRequest

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_BLOCKSIZE = 64


def quantize_weight(w: "torch.Tensor", *, blocksize: int = DEFAULT_BLOCKSIZE) -> BlockwiseQuantized:
    """One weight -> NF4 codes of every value (flattened row-major) and the fp32 absmax of every block."""
    import torch

    x = w.reshape(-1).to(torch.float32)
    code = fmt.nf4_code()
    q, absmax = fmt.blockwise(x, code, blocksize)
    return BlockwiseQuantized(codes=q[: x.numel()], absmax=absmax, code=code, blocksize=blocksize,
                              shape=tuple(w.shape), quant_type="nf4")


def quantize_nf4(
    w: "torch.Tensor", *, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True, absmax_rounding: str = "bnb-cpu"
) -> dict[str, Any]:
    """Quantize and store one weight as bitsandbytes does (a convenience for tests and benchmarks): ``packed``
    uint8 ``[ceil(n/2), 1]``, ``absmax`` (fp32, or uint8 with double quant), ``nested_absmax``, ``offset``
    (float or None), ``code``, ``nested_code``."""
    item = quantize_weight(w, blocksize=blocksize)
    out: dict[str, Any] = {"packed": fmt.pack_codes(item.codes, item.code), "code": item.code}
    if double_quant:
        qa, nested, offset = fmt.double_quantize(item.absmax, absmax_rounding)
        out.update(absmax=qa, nested_absmax=nested, offset=offset, nested_code=fmt.dynamic_map())
    else:
        out.update(absmax=item.absmax, nested_absmax=None, offset=None, nested_code=None)
    return out


def quantize(request: QuantizeRequest) -> Iterator[tuple[str, BlockwiseQuantized]]:
    """The ``nf4`` quantizer: every target independently, no calibration."""
    blocksize = int((request.options or {}).get("blocksize", DEFAULT_BLOCKSIZE))
    for module in request.targets:
        yield module, quantize_weight(request.weight(module), blocksize=blocksize)
