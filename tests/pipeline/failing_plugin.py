"""A test-only quantizer that fails midway: it yields the int8 absmax result of the first target linears, then
raises while ``ADAPTKIT_TEST_FAIL_MIDWAY`` is set (so a rerun without it succeeds). Imports adaptkit only."""
from __future__ import annotations

import os

from adaptkit import hookimpl
from adaptkit.registry import Quantizer

ENV = "ADAPTKIT_TEST_FAIL_MIDWAY"


def quantize(request):
    from adaptkit_example_quant.absmax import quantize as absmax

    for i, item in enumerate(absmax(request)):
        if i == 3 and os.environ.get(ENV):
            raise RuntimeError("simulated crash in the middle of quantizing")
        yield item


class MidwayFailingQuant:
    ADAPTKIT_DISTRIBUTION = "midway-quant"
    __version__ = "1.0"

    @hookimpl
    def adaptkit_register_quantizers(self, registry):
        registry.register(Quantizer(name="flaky8", impl=f"{__name__}:quantize", formats=("bnb-int8",), bits=(8,),
                                    accepts=("bits",)))
