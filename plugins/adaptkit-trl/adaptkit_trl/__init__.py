"""adaptkit-trl: adaptkit trainers built on TRL and PEFT (registered through the ``adaptkit`` entry point).

Module map: ``plugin`` (registrations, no heavy imports), ``versions`` (supported TRL/PEFT/transformers
ranges), ``rewards`` (GRPO reward functions), ``data`` (recipe rows -> ``datasets.Dataset`` per method),
``models`` (base loading, QLoRA quantization, PEFT configs per adapter kind), ``engine`` (TrainingArguments
with per-device defaults, progress/token callbacks, guards, artifact), ``methods`` (one entry per trainer).
"""
__version__ = "0.1.0"
