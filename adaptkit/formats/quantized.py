"""TRANSITION STUB (replaced by the quantize-kind work): re-exports the dequantizing loader."""
from adaptkit_quant.loader import detect, open_quantized  # noqa: F401
