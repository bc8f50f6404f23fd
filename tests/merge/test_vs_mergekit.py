"""adaptkit's merges against mergekit 0.1.5 (a dev-only dependency, run in-process here, never imported
by adaptkit) on tiny Llama models: the same YAML gives the same tensors.

mergekit is run with ``dtype: float32`` (its math in fp32) and ``out_dtype: bfloat16``, so both tools round
the fp32 result once: outputs must be equal except for rare 1-ulp ties. DARE methods are random (different
generators), so they are compared in distribution: kept fraction and rescaled magnitude.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

pytest.importorskip("mergekit")

from adaptkit.cli import main  # noqa: E402
from adaptkit.testing.tiny import make_tiny_llama, perturbed_copy  # noqa: E402


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("mkzoo")
    for dt in ("float32", "bfloat16"):
        make_tiny_llama(root / dt / "base", dtype=dt, num_layers=3, seed=11)
        perturbed_copy(root / dt / "base", root / dt / "a", seed=1, scale=0.2)
        perturbed_copy(root / dt / "base", root / dt / "b", seed=2, scale=0.2)
    make_tiny_llama(root / "bias" / "base", attention_bias=True, mlp_bias=True, seed=12)
    perturbed_copy(root / "bias" / "base", root / "bias" / "a", seed=3, scale=0.2)
    return root


def run_mergekit(cfg: dict, out: Path, seed: int = 0) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              options=MergeOptions(copy_tokenizer=False, quiet=True, random_seed=seed, write_model_card=False))
    return out


def run_adaptkit(cfg: dict, out: Path, *extra: str) -> Path:
    cfg_path = out.parent / f"{out.name}.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(main, ["merge", str(cfg_path), str(out), "-q", *extra])
    assert r.exit_code == 0, r.output
    return out


def _ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    # spacing of bfloat16 numbers around |x| (8 significant bits)
    e = torch.floor(torch.log2(x.double().abs().clamp_min(2.0**-126)))
    return torch.pow(2.0, e - 7)


def assert_same_within_rounding(ak: dict, mk: dict, *, max_ulps: float = 1.0, max_frac: float = 1e-3,
                                allowed: dict | None = None):
    """Equal up to one bf16 ulp on at most ``max_frac`` of the entries; ``allowed[name]`` marks entries
    where the two tools may legitimately differ (magnitude ties at a sparsification threshold)."""
    assert set(ak) == set(mk)
    for name in sorted(mk):
        a, m = ak[name], mk[name]
        assert a.shape == m.shape and a.dtype == m.dtype, name
        diff = (a.double() - m.double()).abs()
        # entries that cancel to ~0 carry fp32 noise relative to the tensor's scale, far below its bf16 ulp
        off = diff > 2.0**-16 * m.double().abs().max()
        if allowed is not None and name in allowed:
            off &= ~allowed[name]
        frac = off.double().mean().item()
        assert frac <= max_frac or off.sum().item() <= 1, f"{name}: {frac:.4%} of entries differ"
        if off.any():
            ulps = (diff / _ulp_bf16(torch.maximum(a.double().abs(), m.double().abs())))[off]
            assert ulps.max().item() <= max_ulps, f"{name}: off by {ulps.max().item():.2f} ulp"


def _cfgs(d: Path) -> dict[str, dict]:
    P = lambda n: str(d / n)
    common = {"dtype": "float32", "out_dtype": "bfloat16"}
    return {
        "linear": {"merge_method": "linear", **common, "models": [
            {"model": P("a"), "parameters": {"weight": 0.3}},
            {"model": P("b"), "parameters": {"weight": [0.7, 0.2]}}]},
        "slerp": {"merge_method": "slerp", "base_model": P("a"), **common, "slices": [{"sources": [
            {"model": P("a"), "layer_range": [0, 3]}, {"model": P("b"), "layer_range": [0, 3]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.4}]}},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": P("base"), **common,
                            "parameters": {"lambda": 0.9}, "models": [
            {"model": P("a"), "parameters": {"weight": 0.7}},
            {"model": P("b"), "parameters": {"weight": 0.5}}]},
        "ties": {"merge_method": "ties", "base_model": P("base"), **common, "parameters": {"normalize": True},
                 "models": [{"model": P("a"), "parameters": {"weight": 0.6, "density": 0.5}},
                            {"model": P("b"), "parameters": {"weight": 0.4, "density": [0.3, 0.8]}},
                            {"model": P("base")}]},
        "model_stock": {"merge_method": "model_stock", "base_model": P("base"), **common,
                        "models": [{"model": P("a")}, {"model": P("b")}, {"model": P("base")}]},
    }


def _threshold_ties(d: Path, densities: dict[str, float]) -> dict[str, torch.Tensor]:
    """Entries whose |task vector| equals the k-th largest one for some model: which of several equal
    magnitudes survives the trim is an arbitrary tie-break (mergekit: unstable argsort; adaptkit: lower
    index first). Frequent with bf16 inputs, whose deltas take few distinct values."""
    base = _load_dir(d / "base")
    out: dict[str, torch.Tensor] = {}
    for model, density in densities.items():
        m = _load_dir(d / model)
        for name, b in base.items():
            delta = (m[name].float() - b.float()).abs().reshape(-1)
            k = max(1, int(density * delta.numel()))
            thr = torch.topk(delta, k).values[-1]
            tied = (delta == thr).reshape(b.shape)
            out[name] = out.get(name, torch.zeros_like(tied)) | tied
    return out


def _sign_ties(d: Path, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Entries where the weighted task vectors cancel up to fp32 rounding: the elected sign is a coin toss
    decided by the order of fp32 operations (bf16 deltas are small multiples of one ulp, so exact
    cancellations like 0.6 * 3u - 0.4 * 4.5u occur)."""
    base = _load_dir(d / "base")
    models = {m: _load_dir(d / m) for m in weights}
    out = {}
    for name, b in base.items():
        terms = [w * (models[m][name].double() - b.double()) for m, w in weights.items()]
        total = sum(terms)
        scale = sum(t.abs() for t in terms)
        out[name] = total.abs() <= 1e-6 * scale
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["linear", "slerp", "task_arithmetic", "ties", "model_stock"])
def test_same_tensors_as_mergekit(zoo, tmp_path, method, dtype):
    cfg = _cfgs(zoo / dtype)[method]
    allowed = None
    if method == "ties" and dtype == "bfloat16":
        cfg["models"][1]["parameters"]["density"] = 0.8
        allowed = _threshold_ties(zoo / dtype, {"a": 0.5, "b": 0.8})
        signs = _sign_ties(zoo / dtype, {"a": 0.6, "b": 0.4})
        allowed = {k: v | signs[k] for k, v in allowed.items()}
    mk = _load_dir(run_mergekit(cfg, tmp_path / "mk"))
    ak = _load_dir(run_adaptkit(cfg, tmp_path / "ak"))
    assert_same_within_rounding(ak, mk, allowed=allowed)


def _delta_stats(out: dict, base: dict) -> tuple[float, float]:
    kept = total = 0
    l1 = 0.0
    for name, b in base.items():
        if b.dim() != 2:
            continue
        d = out[name].double() - b.double()
        kept += int((d != 0).sum())
        total += d.numel()
        l1 += float(d.abs().sum())
    return kept / total, l1


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_mergekit_in_distribution(zoo, tmp_path, method):
    d = zoo / "float32"
    cfg = {"merge_method": method, "base_model": str(d / "base"), "dtype": "float32",
           "models": [{"model": str(d / "a"), "parameters": {"weight": 0.8, "density": 0.4}},
                      {"model": str(d / "b"), "parameters": {"weight": 0.5, "density": 0.4}}]}
    if method == "dare_linear":
        cfg["models"] = cfg["models"][:1]
    base = _load_dir(d / "base")
    mk = _load_dir(run_mergekit(cfg, tmp_path / "mk", seed=5))
    ak = _load_dir(run_adaptkit(cfg, tmp_path / "ak", "--seed", "5"))
    kf_mk, l1_mk = _delta_stats(mk, base)
    kf_ak, l1_ak = _delta_stats(ak, base)
    expected = 0.4 if method == "dare_linear" else 1 - 0.6 * 0.6  # union of two independent 40% masks
    assert abs(kf_mk - expected) < 0.02 and abs(kf_ak - kf_mk) < 0.02, (kf_ak, kf_mk)
    assert abs(l1_ak / l1_mk - 1) < 0.03, (l1_ak, l1_mk)
    # adaptkit's masks are reproducible from --seed; another seed gives another mask
    again = _load_dir(run_adaptkit(cfg, tmp_path / "ak2", "--seed", "5"))
    other = _load_dir(run_adaptkit(cfg, tmp_path / "ak3", "--seed", "6"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(again[name], ak[name]) and not torch.equal(other[name], ak[name])


def test_adaptkit_keeps_biases_that_mergekit_drops(zoo, tmp_path):
    d = zoo / "bias"
    cfg = {"merge_method": "linear", "models": [{"model": str(d / "base"), "parameters": {"weight": 0.25}},
                                               {"model": str(d / "a"), "parameters": {"weight": 0.75}}]}
    base, a = _load_dir(d / "base"), _load_dir(d / "a")
    biases = {n for n in base if n.endswith(".bias")}
    assert biases
    mk = _load_dir(run_mergekit(cfg, tmp_path / "mk"))
    ak = _load_dir(run_adaptkit(cfg, tmp_path / "ak"))
    assert not (biases & set(mk))  # mergekit 0.1.5 silently drops them (exit 0)
    assert set(ak) == set(base)
    for n in biases:
        ref = (0.25 * base[n].double() + 0.75 * a[n].double()).float()
        assert torch.allclose(ak[n], ref, rtol=1e-6, atol=1e-8), n
    assert_same_within_rounding({k: v for k, v in ak.items() if k in mk}, mk)


def test_slerp_with_unrelated_rows_matches_mergekit(zoo, tmp_path):
    """A variant whose rows are half identical to the base and half unrelated: a slerp that used per-row
    angles would differ from one using the whole tensor's angle, so this pins the granularity too."""
    import shutil

    from safetensors.torch import save_file

    d = zoo / "float32"
    shutil.copytree(d / "a", tmp_path / "half")
    t = load_file(str(tmp_path / "half" / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for k, v in t.items():
        if v.dim() == 2:
            v = v.clone()
            h = v.shape[0] // 2
            v[h:] = torch.randn(v[h:].shape, generator=g) * v.std()
            t[k] = v
    save_file(t, str(tmp_path / "half" / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"merge_method": "slerp", "base_model": str(d / "a"), "dtype": "float32", "out_dtype": "bfloat16",
           "models": [{"model": str(d / "a")}, {"model": str(tmp_path / "half")}], "parameters": {"t": 0.3}}
    mk = _load_dir(run_mergekit(cfg, tmp_path / "mk"))
    ak = _load_dir(run_adaptkit(cfg, tmp_path / "ak"))
    assert_same_within_rounding(ak, mk)
