"""The engine's fast paths must not change results.

* ``owned`` inputs (the engine's own upcast copies): task vectors computed in place, DARE drop/rescale fused
  with the mask draws, the TIES trim as ``hardshrink``, the result written into the base tensor. Every
  task-vector method and option set must give the same values as the default (copying) path, which the other
  tests hold to float64 references and mergekit.
* The exact top-k selection (sampled bracket, heavy-tie shortcut, block search for the tie cutoff) must keep
  exactly the ``k`` largest magnitudes, ties by lower index -- checked against a stable full sort.
"""
from __future__ import annotations

import pytest
import torch

from adaptkit.merge import sparsify as sp
from adaptkit.merge import task_arithmetic as ta
from adaptkit.merge.api import MergeInputs

SHAPE = (600, 512)  # 307200 elements: above the exact-selection cutoff, so the sampled paths run


def _models(n, seed=0, spread=0.0003, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(SHAPE, generator=g) * 0.02).to(torch.bfloat16).to(dtype)
    xs = [(base + spread * torch.randn(SHAPE, generator=g)).to(torch.bfloat16).to(dtype) for _ in range(n)]
    xs[0].view(-1)[:1000] = base.view(-1)[:1000]  # some zero task-vector entries
    return base, xs


def _inputs(name, base, xs, params, gparams, owned):
    inp = MergeInputs(name=name, tensors=[x.clone() for x in xs], base=base.clone(), params=params,
                      global_params=gparams, models=[f"m{i}" for i in range(len(xs))], seed=7)
    if owned:
        inp.owned = True
    return inp


CASES = [
    ("ties", {}, {"normalize": True}),
    ("ties", {}, {"normalize": True, "normalize_by": "count", "sign_election": "unweighted"}),
    ("ties", {}, {"normalize": False, "election_precision": "compute", "lambda": 0.7}),
    ("ties", {}, {"normalize": True, "consensus_method": "count", "rescale": True}),
    ("ties", {}, {"normalize": True, "magnitude_tiebreak": "sort"}),
    ("dare_ties", {}, {"rescale": True}),
    ("dare_ties", {}, {"rescale": True, "rescale_mode": "inverse_p", "normalize": True}),
    ("dare_ties", {}, {"rescale": False}),
    ("dare_linear", {}, {"rescale": True}),
    ("breadcrumbs", {"gamma": 0.01}, {}),
    ("breadcrumbs_ties", {"gamma": 0.05}, {"normalize": True}),
    ("della", {"epsilon": 0.1}, {"normalize": True, "rescale": True}),
    ("task_arithmetic", {}, {"lambda": 0.5}),
]


@pytest.mark.parametrize("method,pextra,gparams", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_owned_inputs_give_identical_results(method, pextra, gparams):
    base, xs = _models(3)
    weights = [0.6, -0.3, 0.45]
    densities = [0.5, 0.3, 1.0] if method != "della" else [0.5, 0.3, 0.6]
    params = [{"weight": w, "density": d, **pextra} for w, d in zip(weights, densities)]
    fn = getattr(ta, method)
    want = fn(_inputs("model.layers.0.mlp.up_proj.weight", base, xs, params, gparams, owned=False))
    got = fn(_inputs("model.layers.0.mlp.up_proj.weight", base, xs, params, gparams, owned=True))
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), f"{int((got != want).sum())} elements differ"
    # the copying path leaves the caller's tensors alone
    inp = _inputs("t", base, xs, params, gparams, owned=False)
    fn(inp)
    assert torch.equal(inp.base, base) and all(torch.equal(a, b) for a, b in zip(inp.tensors, xs))


def test_owned_inputs_float64():
    base, xs = _models(2, dtype=torch.float64)
    params = [{"weight": 0.5, "density": 0.4}, {"weight": 0.7, "density": 0.6}]
    for method, g in [("ties", {"normalize": True}), ("dare_ties", {"rescale": True})]:
        fn = getattr(ta, method)
        want = fn(_inputs("w", base, xs, params, g, owned=False))
        got = fn(_inputs("w", base, xs, params, g, owned=True))
        assert got.dtype == torch.float64 and torch.equal(got, want)


def test_aliased_owned_inputs_are_not_overwritten():
    base, xs = _models(2)
    params = [{"weight": 0.5, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    want = ta.ties(_inputs("w", base, [xs[0], base], params, {"normalize": True}, owned=False))
    inp = _inputs("w", base, [xs[0]], params[:1], {"normalize": True}, owned=True)
    inp.tensors.append(inp.base)  # the same tensor twice: the in-place path must not be taken
    inp.params = params
    got = ta.ties(inp)
    assert torch.equal(got, want)


def _reference_keep(a: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest of a, ties by lower index: a stable descending sort."""
    order = torch.sort(a.double(), descending=True, stable=True).indices
    keep = torch.zeros(a.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep


@pytest.mark.parametrize("kind", ["bf16", "fp32", "few_values", "zeros"])
@pytest.mark.parametrize("density", [0.02, 0.5, 0.93])
def test_top_k_selection_matches_stable_sort(kind, density):
    g = torch.Generator().manual_seed(hash((kind, density)) % 1000)
    n = 300_001
    if kind == "bf16":
        b = (torch.randn(n, generator=g) * 0.02).bfloat16().float()
        a = ((b + torch.randn(n, generator=g) * 3e-4).bfloat16().float() - b).abs()
    elif kind == "fp32":
        a = torch.randn(n, generator=g).abs()
    elif kind == "few_values":
        a = torch.randint(0, 5, (n,), generator=g).float()
    else:
        a = torch.randn(n, generator=g).abs()
        a[torch.rand(n, generator=g) < 0.7] = 0.0
    k = sp.magnitude_k(density, n)
    want = _reference_keep(a, k)
    for chunk in (sp.CHUNK, 65_537):
        m = sp.TopKMasker(a, None, 0, k, chunk=chunk)
        got = torch.empty(n, dtype=torch.bool)
        for s in range(0, n, 100_003):
            e = min(n, s + 100_003)
            m.mask(s, e, a[s:e], got[s:e])
        assert torch.equal(got, want)
        # the in-place trim keeps the same entries
        d = a.clone()
        for s in range(0, n, 100_003):
            e = min(n, s + 100_003)
            m.trim(s, e, d[s:e], torch.empty(e - s))
        assert torch.equal(d != 0, want & (a != 0))


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_builtin_linear_checks_inputs_on_the_result(tmp_path, monkeypatch, weights, bad):
    """The built-in linear merge checks NaN/Inf on its result (one pass) and then names the input, also for a
    zero weight and for a large tensor fed in row blocks (a block size of 256 elements here)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from adaptkit.errors import CheckpointError
    from adaptkit.merge import budget, engine
    from adaptkit.testing.tiny import make_tiny_llama, perturbed_copy

    make_tiny_llama(tmp_path / "a", seed=0)
    perturbed_copy(tmp_path / "a", tmp_path / "b", seed=1)
    shutil.copytree(tmp_path / "b", tmp_path / "bad")
    f = tmp_path / "bad" / "model.safetensors"
    tensors = load_file(str(f))
    name = "model.embed_tokens.weight"
    t = tensors[name].clone()
    t.view(-1)[t.numel() - 5] = float(bad)
    tensors[name] = t
    save_file(tensors, str(f), metadata={"format": "pt"})
    monkeypatch.setattr(budget, "ROW_CHUNK_NUMEL", 256)
    monkeypatch.setattr(budget, "PREFETCH_MAX_BYTES", 0)  # no prefetch: large tensors go in row blocks
    cfg = {"merge_method": "linear", "dtype": "bfloat16",
           "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": weights[0]}},
                      {"model": str(tmp_path / "bad"), "parameters": {"weight": weights[1]}}]}
    kind = "NaN" if bad == "nan" else "Inf"
    with pytest.raises(CheckpointError, match=rf"model '.*bad': tensor '{name}' contains {kind} \(1 of"):
        engine.merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # a finite merge of the same models goes through
    cfg["models"][1]["model"] = str(tmp_path / "b")
    engine.merge(cfg, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").exists()
