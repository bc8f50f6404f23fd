"""Example adaptkit plugin: per-output-channel absmax int8 quantization, written as bitsandbytes LLM.int8."""
