"""Project-wide test setup: offline Hugging Face libraries and adaptkit's own pytest plugin (fixtures
``tiny_llama``, ``smollm2``, ``adaptkit_pm``, ``adaptkit_pm_factory``, ``adaptkit_cli``; see specs/testing.md)."""
import os

# Before anything imports huggingface_hub/transformers (they read these once, at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

pytest_plugins = ["adaptkit.testing.pytest_plugin", "pytester"]
