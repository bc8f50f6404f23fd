"""mergekit's adapter references in ``adaptkit merge`` configs: ``"base+adapter"`` and
``model: {model: {path: ...}, lora: {path: ...}}`` open the base with the adapter merged in on read (fp32, one
rounding at the end). Reference: PEFT's own ``merge_and_unload()`` and a float64 average."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
yaml = pytest.importorskip("yaml")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from adaptkit.testing import make_tiny_llama

    root = tmp_path_factory.mktemp("refs")
    base = make_tiny_llama(root / "base", seed=3)
    other = make_tiny_llama(root / "other", seed=4)
    wide = make_tiny_llama(root / "wide", hidden_size=96, seed=5)
    m = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(str(root / "adapter"))
    merged = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return root, merged, wide


@pytest.mark.parametrize("form", ["string", "mapping"])
def test_adapter_reference_matches_peft(models, adaptkit_cli, form) -> None:
    from safetensors.torch import load_file

    root, merged, _ = models
    ref = "base+adapter" if form == "string" else {"model": {"path": "base"}, "lora": {"path": "adapter"}}
    cfg = root / f"{form}.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": ref, "parameters": {"weight": 0.5}}, {"model": "other", "parameters": {"weight": 0.5}}]}))
    dry = adaptkit_cli("merge", cfg, root / f"dry-{form}", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.stderr
    assert "base+adapter" in json.dumps(json.loads(dry.stdout)["models"])
    r = adaptkit_cli("merge", cfg, root / f"out-{form}", "-q")
    assert r.exit_code == 0, r.stderr
    out = load_file(str(root / f"out-{form}" / "model.safetensors"))
    other = load_file(str(root / "other" / "model.safetensors"))
    for name, t in out.items():
        want = 0.5 * merged[name].double() + 0.5 * other[name].double()
        assert (t.double() - want).abs().max() <= 1e-6 * want.abs().max(), name


def test_adapter_for_another_base_is_one_line(models, adaptkit_cli) -> None:
    root, _, wide = models
    cfg = root / "bad.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": f"{wide.name}+adapter", "parameters": {"weight": 1.0}}]}))
    r = adaptkit_cli("merge", cfg, root / "bad-out")
    assert r.exit_code == 4, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model 'wide+adapter'") and "shape" in lines[0]
    assert not (root / "bad-out").exists()


def test_unknown_key_in_a_reference_mapping(models, adaptkit_cli) -> None:
    root, _, _ = models
    cfg = root / "typo.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": {"model": "base", "lorra": "adapter"}, "parameters": {"weight": 1.0}}]}))
    r = adaptkit_cli("merge", cfg, root / "typo-out")
    assert r.exit_code == 3 and "did you mean 'lora'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
