"""Parity with PEFT: our streaming merge against PEFT's own ``merge_and_unload()`` on the fp32 base, for every
adapter kind and config field adaptkit claims to support (max relative tensor difference <= 1e-6)."""
from __future__ import annotations

import json
import math

import pytest

from tests.adapters.conftest import load_fp32, max_rel_diff

TOL = 1e-6


def _cases():
    from peft import IA3Config, LoraConfig

    return {
        "lora-all-linear-modules_to_save": ("llama", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                modules_to_save=["lm_head"])),
        "rslora-patterns-embedding": ("llama", LoraConfig(
            r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
            rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3})),
        "dora": ("llama", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)),
        "dora-embedding": ("llama", LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "up_proj"],
                                               use_dora=True)),
        "ia3-feedforward-and-bias": ("llama_bias", IA3Config(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                                                             feedforward_modules=["down_proj"])),
        "lora-bias-all-lora_bias": ("llama_bias", LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "up_proj"],
                                                             bias="all", lora_bias=True)),
        "gpt2-fan_in_fan_out-lora": ("gpt2", LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                                        fan_in_fan_out=True)),
        "gpt2-fan_in_fan_out-dora": ("gpt2", LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                        fan_in_fan_out=True, use_dora=True)),
        "gpt2-fan_in_fan_out-ia3": ("gpt2", IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                                      feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)),
    }


CASES = ["lora-all-linear-modules_to_save", "rslora-patterns-embedding", "dora", "dora-embedding",
         "ia3-feedforward-and-bias", "lora-bias-all-lora_bias", "gpt2-fan_in_fan_out-lora",
         "gpt2-fan_in_fan_out-dora", "gpt2-fan_in_fan_out-ia3"]


@pytest.mark.parametrize("case", CASES)
def test_view_matches_peft_merge_and_unload(case, bases, host, adapter_factory):
    from adaptkit.adapters import AdaptedCheckpoint

    base_key, config = _cases()[case]
    adapter, ref = adapter_factory(bases[base_key], config, name=case)
    with AdaptedCheckpoint(host.open_model(bases[base_key]), [adapter], close_base=True) as view:
        changed = view.changed()
        assert changed, "the adapter changed nothing"
        worst = {n: max_rel_diff(view.get(n), ref[n]) for n in view.names()}
    bad = {n: d for n, d in worst.items() if d > TOL}
    assert not bad, f"{case}: tensors differ from PEFT's merge: {bad}"
    # every tensor PEFT changed is one we changed (and vice versa)
    base_sd = load_fp32(bases[base_key]).state_dict()
    peft_changed = {n for n in worst if not bool((ref[n] == base_sd[n]).all())}
    assert peft_changed == set(changed) - {n for n in changed if bool((ref[n] == base_sd[n]).all())}


def test_cli_output_is_peft_merge_with_provenance(bases, adapter_factory, adaptkit_cli, tmp_path):
    from peft import LoraConfig

    base = bases["llama"]
    adapter, ref = adapter_factory(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), name="a")
    out = tmp_path / "merged"
    res = adaptkit_cli("merge-adapter", base, adapter, out, "--json", "-q")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    merged = load_fp32(out).state_dict()
    assert max(max_rel_diff(merged[n], ref[n]) for n in merged) <= TOL
    prov = json.loads((out / "adaptkit.json").read_text())
    import hashlib

    sha = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    assert prov["kind"] == "merge-adapter"
    assert prov["base"]["sha256"] == {"model.safetensors": sha}
    assert prov["adapters"][0]["path"] == str(adapter) and prov["adapters"][0]["weight"] == 1.0
    asha = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert prov["adapters"][0]["sha256"] == asha
    card = (out / "README.md").read_text()
    assert sha in card and str(adapter) in card
    assert doc["changed_tensors"] == 14 and (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert (out / "adaptkit-manifest.json").is_file()


def test_weighted_adapters_match_float64_formula(bases, host, adapter_factory):
    """Two LoRA adapters with weights: W' = W + sum_i w_i * (alpha_i / r_i) * B_i @ A_i, rounded once."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file

    from adaptkit.adapters import AdaptedCheckpoint

    base = bases["llama"]
    a1, _ = adapter_factory(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]), seed=1)
    a2, _ = adapter_factory(base, LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]), seed=2)
    weights = [0.7, -0.4]
    base_sd = load_file(str(base / "model.safetensors"))
    expect = {k: v.to(torch.float64) for k, v in base_sd.items()}
    for ad, w, s in ((a1, weights[0], 8 / 4), (a2, weights[1], 6 / 2)):
        sd = load_file(str(ad / "adapter_model.safetensors"))
        for k in sd:
            if k.endswith("lora_A.weight"):
                mod = k[len("base_model.model."):-len(".lora_A.weight")]
                b = sd[k.replace("lora_A", "lora_B")].double()
                expect[mod + ".weight"] += w * s * (b @ sd[k].double())
    with AdaptedCheckpoint(host.open_model(base), [a1, a2], weights, close_base=True) as view:
        for n in view.names():
            got = view.get(n)
            assert got.dtype == base_sd[n].dtype
            assert max_rel_diff(got, expect[n]) <= 2 ** -22, n


def test_view_dtype_and_fp32_access(bases, host, adapter_factory):
    import torch
    from peft import LoraConfig

    from adaptkit.adapters import AdaptedCheckpoint

    base = bases["llama"]
    ad, ref = adapter_factory(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with AdaptedCheckpoint(host.open_model(base), [ad], dtype="bfloat16", close_base=True) as view:
        n = "model.layers.0.self_attn.q_proj.weight"
        assert view.info(n).dtype == "BF16" and view.get(n).dtype == torch.bfloat16
        assert view.config["torch_dtype"] == "bfloat16"
        exact = view.get_fp32(n)
        assert exact.dtype == torch.float32 and max_rel_diff(exact, ref[n]) <= TOL
        assert torch.equal(view.get(n), exact.to(torch.bfloat16))  # rounded once, from the fp32 result
        assert math.isclose(view.total_bytes, sum(view.info(x).nbytes for x in view.names()))


def test_open_reference_plus_syntax(bases, host, adapter_factory):
    from peft import LoraConfig

    from adaptkit.adapters import AdaptedCheckpoint, open_reference, split_reference

    base = bases["llama"]
    ad, ref = adapter_factory(base, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]))
    assert split_reference(f"{base}+{ad}") == (str(base), [str(ad)])
    assert split_reference(str(base)) == (str(base), [])
    view = open_reference(host, f"{base}+{ad}")
    try:
        assert isinstance(view, AdaptedCheckpoint)
        n = "model.layers.1.self_attn.v_proj.weight"
        assert max_rel_diff(view.get(n), ref[n]) <= TOL
        ident = view.identity()
        assert ident["adapters"][0]["path"] == str(ad) and "sha256" in ident["base"]
    finally:
        view.close()
    plain = open_reference(host, base)
    assert not isinstance(plain, AdaptedCheckpoint)
    plain.close()


@pytest.mark.parametrize("dtype", [None, "bfloat16", "float16"])
def test_numpy_path_matches_torch_path(dtype, bases, host, adapter_factory, tmp_path):
    """merge-adapter's writer computes plain LoRA (and full copies) with numpy, without importing torch: the
    same fp32 arithmetic rounded once, so the bytes equal the torch path's except where the two BLAS round
    a K=r dot product differently (one fp32 ulp)."""
    import numpy as np
    import torch
    from peft import LoraConfig

    from adaptkit.adapters import AdaptedCheckpoint

    base = bases["llama"]
    a1, _ = adapter_factory(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                             modules_to_save=["lm_head"]), seed=1)
    a2, _ = adapter_factory(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"]), seed=2)
    with AdaptedCheckpoint(host.open_model(base), [a1, a2], [0.8, 1.5], dtype=dtype, close_base=True) as view:
        for n in view.names():
            fast = view.fast_bytes(n)
            assert fast is not None, n
            t = view.get(n)
            ref = t.contiguous().view(-1).view(torch.uint8).numpy()
            if np.array_equal(fast, ref):
                continue
            got = torch.from_numpy(fast.copy()).view(t.dtype).view(t.shape)
            ulp = float(torch.finfo(t.dtype).eps) * float(t.abs().max())
            assert float((got.double() - t.double()).abs().max()) <= 2 * ulp, n


def test_plain_lora_merge_does_not_import_torch(bases, adapter_factory, tmp_path):
    import subprocess
    import sys

    from peft import LoraConfig

    ad, _ = adapter_factory(bases["llama"], LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    code = ("import sys; from adaptkit.cli import main\n"
            f"try: main(['merge-adapter', {str(bases['llama'])!r}, {str(ad)!r}, {str(tmp_path / 'o')!r}, '-q'],"
            " standalone_mode=False)\n"
            "except SystemExit as e: assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "model.safetensors").is_file()
