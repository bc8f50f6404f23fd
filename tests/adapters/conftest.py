"""Fixtures of the adapter tests: tiny bases and adapters made by PEFT itself (the reference implementation)."""
from __future__ import annotations

import os

# idle OpenMP workers sleep (the SVDs here are many short parallel regions; see adaptkit.adapters.tune_openmp)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("peft")


def randomize_adapter(model: Any, seed: int = 1) -> None:
    """Give every trainable adapter tensor a non-trivial value (PEFT initialises B = 0, IA3 = 1, DoRA m = ||W||),
    so merges are actually tested: B ~ N(0, 0.05), IA3/magnitude * (1 + 0.1 N), full copies + 0.01 N."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(0.05 * noise)
            elif "lora_magnitude_vector" in name or "ia3_l" in name:
                p.mul_(1 + 0.1 * noise)
            elif "lora_A" in name or "lora_embedding_A" in name:
                continue
            else:  # modules_to_save copies, trained biases, lora_B bias
                p.add_(0.01 * noise)


def load_fp32(path: Path, **kw: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()


def make_adapter(base: Path, config: Any, out: Path, *, seed: int = 1, model: Any = None) -> tuple[Path, dict]:
    """Save a PEFT adapter made on ``base`` with ``config`` (randomized) to ``out``; return (out, PEFT's
    merge_and_unload() state dict on the fp32 base: the reference)."""
    from peft import get_peft_model

    m = model if model is not None else load_fp32(base)
    pm = get_peft_model(m, config)
    randomize_adapter(pm, seed)
    pm.save_pretrained(str(out))
    merged = pm.merge_and_unload()
    return out, {k: v.detach().clone() for k, v in merged.state_dict().items()}


def max_rel_diff(a: Any, b: Any) -> float:
    """max |a - b| / max |b| (0 for two zero tensors), in float64."""
    import torch

    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    den = float(b64.abs().max()) if b64.numel() else 0.0
    num = float((a64 - b64).abs().max()) if b64.numel() else 0.0
    return num / den if den else num


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random bases: llama (no biases), llama_bias (attention + MLP biases), gpt2 (Conv1D: fan_in_fan_out)."""
    from adaptkit.testing import make_tiny_llama

    root = tmp_path_factory.mktemp("adapter-bases")
    out = {
        "llama": make_tiny_llama(root / "llama", hidden_size=64, num_layers=2, intermediate_size=96),
        "llama_bias": make_tiny_llama(root / "llama_bias", hidden_size=64, num_layers=2, intermediate_size=96,
                                      attention_bias=True, mlp_bias=True, seed=3),
    }
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    g = GPT2LMHeadModel(GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).eval()
    with torch.no_grad():
        for n, p in g.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.02)
    g.save_pretrained(str(root / "gpt2"))
    out["gpt2"] = root / "gpt2"
    return out


@pytest.fixture
def host() -> Any:
    from adaptkit.plugins import get_plugin_manager

    return get_plugin_manager(load_entrypoints=False)


@pytest.fixture
def adapter_factory(tmp_path: Path) -> Callable[..., tuple[Path, dict]]:
    counter = {"n": 0}

    def make(base: Path, config: Any, name: str | None = None, seed: int = 1, model: Any = None) -> tuple[Path, dict]:
        counter["n"] += 1
        return make_adapter(base, config, tmp_path / (name or f"adapter-{counter['n']}"), seed=seed, model=model)

    return make
