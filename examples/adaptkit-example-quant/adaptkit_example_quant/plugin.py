"""Registers the ``int8-absmax`` quantizer. Imports no torch: the implementation is referenced lazily."""
from adaptkit import hookimpl
from adaptkit.registry import Quantizer


@hookimpl
def adaptkit_register_quantizers(registry):
    registry.register(
        Quantizer(
            name="int8-absmax",
            impl="adaptkit_example_quant.absmax:quantize",
            description=(
                "Round-to-nearest symmetric int8 with one scale per output channel (absmax / 127), no "
                "calibration; written in the bitsandbytes LLM.int8 layout that transformers loads with "
                "load_in_8bit."
            ),
            formats=("bnb-int8",),  # a core format: adaptkit packs and writes it (adaptkit.formats.int8)
            bits=(8,),
            accepts=("bits",),  # --group-size, --sym, ... would be ignored, so adaptkit refuses them
        )
    )
