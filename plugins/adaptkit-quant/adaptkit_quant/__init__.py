"""adaptkit-quant: the quantization algorithms rtn, nf4, gptq and awq (plus the layer-by-layer calibration
machinery gptq and awq share, ``layerwise``). Everything else is core: the contract
(``adaptkit.quantize.api``), the runner (``adaptkit.quantize.runner``), calibration text
(``adaptkit.quantize.calib``), the formats they write and the loader that reads them (``adaptkit.formats``).
Importing this package does not import torch."""
from __future__ import annotations

__version__ = "0.1.0"
