"""A third-party quantizer as a plugin author writes it: it imports adaptkit only (never adaptkit_quant).

``sym4`` is a symmetric 4-bit grid with one fp16 scale per group of ``--group-size`` inputs: ``scale = fp16(absmax / 7)``,
``code = clamp(round(w / scale) + 8, 0, 15)`` (computed in float64), written by core as GPTQ v1.
"""
from __future__ import annotations

from adaptkit import hookimpl
from adaptkit.quantize.api import QuantizedLinear
from adaptkit.registry import Param, Quantizer

def quantize_weight(w, spec):
    import torch

    group = spec.group_size
    w64 = w.detach().to(torch.float64)
    out_f, in_f = w64.shape
    g = w64.reshape(out_f, in_f // group, group)
    absmax = g.abs().amax(dim=2)  # [out, G]
    scale = (absmax / 7).to(torch.float16).to(torch.float64)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(g / safe[..., None]) + 8, 0, 15).reshape(out_f, in_f)
    return QuantizedLinear(
        codes=codes.to(torch.uint8), scales=scale.T.to(torch.float32).contiguous(),
        zeros=torch.full((in_f // group, out_f), 8, dtype=torch.int32),
        g_idx=(torch.arange(in_f) // group).to(torch.int32), spec=spec,
    )


def quantize(request):
    for module in request.targets:
        request.report(f"sym4 {module}")
        yield module, quantize_weight(request.weight(module), request.spec)


class ThirdPartyQuant:
    """The plugin object (an installed distribution would name it in its ``adaptkit`` entry point)."""

    ADAPTKIT_DISTRIBUTION = "thirdparty-quant"
    __version__ = "9.9"
    __name__ = "thirdparty_quant"

    @hookimpl
    def adaptkit_register_quantizers(self, registry) -> None:  # noqa: ANN001
        registry.register(Quantizer(
            name="sym4", impl=quantize, formats=("gptq",), bits=(4,), accepts=("bits", "group_size"),
            description="symmetric 4-bit absmax grid per group", params=(Param("unused", int, 1, scope="global"),),
        ))


class StepSpy:
    """Wraps every step (``adaptkit_run_step``) and records what it saw."""

    __name__ = "step_spy"

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict]] = []

    @hookimpl(wrapper=True)
    def adaptkit_run_step(self, step):  # noqa: ANN001
        self.seen.append((step.kind, step.name, dict(step.info)))
        result = yield
        step.metrics["spy"] = True
        return result
