"""extract-lora: an exactly rank-R fine-tune is recovered to fp32 precision (PEFT loads the adapter and
reproduces the fine-tune's logits); truncation follows Eckart-Young; --min-energy picks smaller ranks."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.adapters.conftest import load_fp32, max_rel_diff


def _finetune(base: Path, dst: Path, *, rank: int | None, seed: int = 0, norms: bool = True) -> Path:
    """base + random rank-``rank`` deltas on every 2-D weight (full-rank noise when rank is None), norms nudged."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, dst)
    sd = load_file(str(dst / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for n, t in sd.items():
        if t.ndim == 2:
            o, i = t.shape
            if rank is None:
                d = torch.randn(o, i, generator=g)
            else:
                d = torch.randn(o, rank, generator=g) @ torch.randn(rank, i, generator=g)
            sd[n] = t + 0.02 * d / d.std()
        elif norms and "norm" in n:
            sd[n] = t + 0.01 * torch.randn(t.shape, generator=g)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _probe():
    import torch

    return torch.randint(3, 500, (3, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("exact", [False, True])
def test_exact_rank_finetune_is_recovered(exact, bases, adaptkit_cli, tmp_path):
    import torch
    from peft import PeftModel

    base = bases["llama"]
    ft = _finetune(base, tmp_path / "ft", rank=6)
    out = tmp_path / "lora"
    res = adaptkit_cli("extract-lora", ft, base, out, "--rank", "6", "--json", "-q", *(["--exact"] if exact else []))
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["modules"] == 2 * 7 + 2  # 14 linears, lm_head, embed_tokens (embedding LoRA)
    assert doc["embedding_modules"] == 1 and doc["min_module_energy"] > 1 - 1e-6 and doc["max_rel_error"] < 1e-5
    assert len(doc["modules_to_save"]) == 5  # 4 layer norms + the final norm
    with torch.no_grad():
        want = load_fp32(ft)(input_ids=_probe()).logits
        pm = PeftModel.from_pretrained(load_fp32(base), str(out)).eval()
        got = pm(input_ids=_probe()).logits
        merged = pm.merge_and_unload().state_dict()
    assert float((got - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))
    ft_sd = load_fp32(ft).state_dict()
    assert max(max_rel_diff(merged[n], ft_sd[n]) for n in ft_sd) < 1e-5
    prov = json.loads((out / "adaptkit.json").read_text())
    assert prov["kind"] == "extract-lora" and prov["svd"] == ("exact" if exact else "randomized")
    assert set(prov["finetuned"]["sha256"]) == {"model.safetensors"}


def test_truncation_error_is_eckart_young_and_min_energy(bases, host, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from adaptkit.adapters.extract import extract_lora

    base = bases["llama"]
    ft = _finetune(base, tmp_path / "ft", rank=None, norms=False)
    doc = extract_lora(host, ft, base, tmp_path / "exact", rank=8, exact=True, progress=False)
    a, b = load_file(str(ft / "model.safetensors")), load_file(str(base / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj"
    s = torch.linalg.svdvals((a[name + ".weight"] - b[name + ".weight"]).double())
    energy = float((s[:8] ** 2).sum() / (s ** 2).sum())
    mod = doc["per_module"][name]
    assert mod["energy"] == pytest.approx(energy, rel=1e-5)
    assert mod["rel_error"] == pytest.approx((1 - energy) ** 0.5, rel=1e-4)
    # randomized SVD: close to the optimum on this (hard, flat-spectrum) case
    rnd = extract_lora(host, ft, base, tmp_path / "rnd", rank=8, niter=4, progress=False)
    assert rnd["per_module"][name]["rel_error"] <= 1.03 * mod["rel_error"]
    # --min-energy: the smallest rank reaching the share, recorded in rank_pattern / alpha_pattern (scaling 1)
    low = extract_lora(host, ft, base, tmp_path / "low", rank=8, exact=True, min_energy=0.05, progress=False)
    k = int((torch.cumsum(s ** 2, 0) / (s ** 2).sum() >= 0.05).nonzero()[0]) + 1
    assert low["per_module"][name]["rank"] == k < 8
    cfg = json.loads((tmp_path / "low" / "adapter_config.json").read_text())
    assert any(v == k for v in cfg["rank_pattern"].values()) and cfg["alpha_pattern"]
    merged = PeftModel.from_pretrained(load_fp32(base), str(tmp_path / "low")).merge_and_unload().state_dict()
    d = merged[name + ".weight"].double() - b[name + ".weight"].double()
    u, sv, vh = torch.linalg.svd((a[name + ".weight"] - b[name + ".weight"]).double())
    assert max_rel_diff(d, (u[:, :k] * sv[:k]) @ vh[:k]) < 1e-5
