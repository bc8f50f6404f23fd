"""Project-wide test setup: offline Hugging Face libraries and adaptkit's own pytest plugin (fixtures
``tiny_llama``, ``smollm2``, ``adaptkit_pm``, ``adaptkit_pm_factory``, ``adaptkit_cli``; see specs/testing.md)."""
import os
import sys

import pytest

# Before anything imports huggingface_hub/transformers (they read these once, at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

pytest_plugins = ["adaptkit.testing.pytest_plugin", "pytester"]


@pytest.fixture(autouse=True)
def _grad_mode_is_left_on():
    """No code under test may leave torch's grad mode switched off for its caller (a generator suspended inside
    ``torch.inference_mode()`` does exactly that, and training after it fails with "does not require grad")."""
    yield
    torch = sys.modules.get("torch")
    if torch is not None and not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("the test left torch's grad mode off (a context held across a yield?)", pytrace=False)
