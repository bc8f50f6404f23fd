"""Adapter (+) adapter: several LoRA adapters of one base merged into one LoRA adapter that PEFT loads."""
from __future__ import annotations

import json

import pytest

from tests.adapters.conftest import load_fp32, max_rel_diff


def _deltas64(adapter, scaling):
    """{base weight name: float64 dW} straight from the adapter file (embedding: [num_embeddings, dim])."""
    from safetensors.torch import load_file

    sd = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for k, a in sd.items():
        mod = k[len("base_model.model."):]
        if k.endswith("lora_A.weight"):
            b = sd[k.replace("lora_A", "lora_B")]
            out[mod[: -len(".lora_A.weight")] + ".weight"] = scaling * (b.double() @ a.double())
        elif k.endswith("lora_embedding_A"):
            b = sd[k.replace("lora_embedding_A", "lora_embedding_B")]
            out[mod[: -len(".lora_embedding_A")] + ".weight"] = scaling * (b.double() @ a.double()).T
    return out


def _peft_merged(base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_fp32(base), str(adapter)).merge_and_unload().state_dict()


@pytest.mark.parametrize("exact", [False, True])
def test_linear_sum_is_recovered_exactly_at_full_rank(exact, bases, adapter_factory, adaptkit_cli, tmp_path):
    """dW = 1.0 dW1 + 0.5 dW2 has rank <= 8: a rank-8 adapter reproduces it to fp32 precision."""
    from peft import LoraConfig

    base = bases["llama"]
    a1, _ = adapter_factory(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj", "embed_tokens"],
                                             modules_to_save=["lm_head"]), seed=1)
    a2, _ = adapter_factory(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"]), seed=2)
    out = tmp_path / "sum"
    args = ["merge-adapter", base, a1, a2, out, "--into-adapter", "--method", "linear", "-o", "normalize=false",
            "--weights", "1,0.5", "--rank", "8", "--json", "-q"] + (["--exact"] if exact else [])
    res = adaptkit_cli(*args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["modules"] == 3 * 2 + 1 and doc["max_rel_error"] < 1e-5
    base_sd = load_fp32(base).state_dict()
    expect = {k: v.double() for k, v in base_sd.items()}
    for ad, w, s in ((a1, 1.0, 2.0), (a2, 0.5, 1.0)):
        for k, d in _deltas64(ad, s).items():
            expect[k] += w * d
    from safetensors.torch import load_file

    expect["lm_head.weight"] = load_file(str(a1 / "adapter_model.safetensors"))["base_model.model.lm_head.weight"].double()
    got = _peft_merged(base, out)
    for k in expect:
        d = got[k].double() - base_sd[k].double()
        e = expect[k] - base_sd[k].double()
        if float(e.abs().max()) == 0:
            assert float(d.abs().max()) == 0, k
        else:
            assert max_rel_diff(d, e) < 1e-5, k
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["modules_to_save"] == ["lm_head"]
    prov = json.loads((out / "adaptkit.json").read_text())
    assert [a["weight"] for a in prov["adapters"]] == [1.0, 0.5] and prov["method"] == "linear"
    assert "library_name: peft" in (out / "README.md").read_text()


def test_ties_on_deltas_then_truncated_svd(bases, adapter_factory, adaptkit_cli, tmp_path):
    """TIES runs on the deltas (zero base) through the registered method; the rank-r factor is the truncated SVD
    (Eckart-Young: its error is the energy of the dropped singular values, reported per module)."""
    import torch
    from peft import LoraConfig

    from adaptkit.merge.api import MergeInputs
    from adaptkit.plugins import get_plugin_manager

    base = bases["llama"]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"])
    a1, _ = adapter_factory(base, cfg, seed=3)
    a2, _ = adapter_factory(base, cfg, seed=4)
    out = tmp_path / "ties"
    res = adaptkit_cli("merge-adapter", base, a1, a2, out, "--into-adapter", "-m", "ties", "-o", "density=0.5",
                       "--rank", "4", "--exact", "--json", "-q")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    comp = get_plugin_manager(load_entrypoints=False).mergers.get("ties")
    d1, d2 = _deltas64(a1, 2.0), _deltas64(a2, 2.0)
    base_sd = load_fp32(base).state_dict()
    got = _peft_merged(base, out)
    for name in d1:
        params = [comp.resolve_options({"weight": 1.0, "density": 0.5}) for _ in range(2)]
        glob = params[0]
        ref_full = comp.load()(MergeInputs(name=name, tensors=[d1[name].float(), d2[name].float()],
                                           base=torch.zeros_like(d1[name].float()), params=params, global_params=glob))
        u, s, vh = torch.linalg.svd(ref_full.double())
        ref = (u[:, :4] * s[:4]) @ vh[:4]
        delta = got[name].double() - base_sd[name].double()
        assert max_rel_diff(delta, ref) < 1e-5, name
        mod = doc["per_module"][name[: -len(".weight")]]
        dropped = float((s[4:] ** 2).sum() / (s ** 2).sum()) ** 0.5
        assert mod["rel_error"] == pytest.approx(dropped, rel=1e-3, abs=1e-6)
