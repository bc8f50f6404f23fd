"""The ``adaptkit`` entry point of adaptkit-quant: registers the quantizers rtn, nf4, gptq and awq.

Each declares what the core runner needs to know (``formats``, ``bits``, ``accepts``, ``needs_calibration``,
``params``); the formats they write and the loader that reads them back are core (``adaptkit.formats``).
Imports nothing heavy: implementations are named lazily (``"module:function"``).
"""
from __future__ import annotations

from adaptkit import hookimpl
from adaptkit.registry import Param, Quantizer

QUANTIZERS = (
    Quantizer(
        name="rtn",
        impl="adaptkit_quant.rtn:quantize",
        description="round-to-nearest baseline: group-wise min/max grid, sym/asym, 2/3/4/8 bits; GPTQ v1 format",
        formats=("gptq",),
        bits=(2, 3, 4, 8),
        accepts=("bits", "group_size", "sym", "partial_groups"),
    ),
    Quantizer(
        name="nf4",
        impl="adaptkit_quant.nf4:quantize",
        description="bitsandbytes NF4 (4-bit NormalFloat, blockwise absmax, double quantization); bnb 4-bit layout",
        params=(
            Param("blocksize", int, 64, scope="global", choices=(32, 64, 128, 256, 512, 1024, 2048, 4096),
                  help="values per absmax block"),
            Param("double_quant", bool, True, scope="global", help="quantize the absmax values (8-bit, blocks of 256)"),
            Param("compute_dtype", str, "auto", scope="global", choices=("auto", "float32", "float16", "bfloat16"),
                  help="bnb_4bit_compute_dtype recorded in config.json (auto: the weights' dtype)"),
            Param("absmax_rounding", str, "bnb-cpu", scope="global", choices=("bnb-cpu", "nearest"),
                  help="double-quant code choice: bitsandbytes' CPU kernel (65536-point grid) or exact nearest"),
        ),
        formats=("bnb-nf4",),
        bits=(4,),
        accepts=("bits",),  # blocks of -o blocksize values, not groups; always symmetric (absmax)
    ),
    Quantizer(
        name="gptq",
        impl="adaptkit_quant.gptq:quantize",
        description="GPTQ (Frantar et al. 2022): Hessian-based error compensation, layer by layer; GPTQ v1 format",
        params=(
            Param("block_size", int, 128, scope="global", min=1, max=4096,
                  help="columns per lazy-update block (the paper's B)"),
            Param("group_order", str, "gar", scope="global", choices=("gar", "natural"),
                  help="without --act-order: 'gar' = group-aware reordering (salient groups and columns first, "
                       "groups kept contiguous, so no desc_act in the file; GPTQModel's default too); "
                       "'natural' = the paper's left-to-right order"),
        ),
        formats=("gptq",),
        bits=(2, 3, 4, 8),
        accepts=("bits", "group_size", "sym", "act_order", "damp", "partial_groups"),
        needs_calibration=True,
    ),
    Quantizer(
        name="awq",
        impl="adaptkit_quant.awq:quantize",
        description="AWQ (Lin et al. 2023): activation-aware scale search folded into the previous op; AWQ GEMM format",
        params=(
            Param("clip", bool, True, scope="global", help="search a per-group clipping ratio"),
            Param("n_grid", int, 20, scope="global", min=2, max=200, help="scale-search grid points"),
            Param("duo_scaling", bool, True, scope="global",
                  help="scale candidates from activation and weight statistics (AutoAWQ's duo_scaling)"),
        ),
        formats=("awq",),
        bits=(4,),
        accepts=("bits", "group_size"),  # always a zero-point grid (the AWQ GEMM format)
        needs_calibration=True,
    ),
)


@hookimpl
def adaptkit_register_quantizers(registry) -> None:  # noqa: ANN001
    for q in QUANTIZERS:
        registry.register(q)

