"""adaptkit-quant: quantizers (rtn, nf4, gptq, awq) and loaders for GPTQ v1 / AWQ GEMM / bitsandbytes NF4
checkpoints. Importing this package does not import torch. The algorithm contract is in ``adaptkit_quant.api``;
tensor layouts in ``specs/formats.md``."""
from __future__ import annotations

__version__ = "0.1.0"
