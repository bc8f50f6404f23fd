"""Issue 12 (h): how often adaptkit's default TIES/breadcrumbs tie-break (lower index first) differs from
mergekit 0.1.5's (torch.argsort order) on bf16 checkpoints, re-measured on a small model; and that mergekit
mode removes every difference. The figures in specs/merge-math.md come from the same procedure on a larger
model (hidden 256)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("mergekit")

from mergekit.merge_methods.api import merge_tensors  # noqa: E402

from adaptkit.merge.api import MergeInputs  # noqa: E402
from tests.merge.builtin_registry import builtin_registry  # noqa: E402


REG = builtin_registry()


def _ours(method, xs, base, per, g):
    comp = REG.get(method)
    per = [dict(p) for p in per]
    for p in per:
        for d in comp.params:
            if d.scope != "global" and d.name not in p and not d.required:
                p[d.name] = d.default
    g = dict(g)
    for d in comp.params:
        if d.scope != "model" and d.name not in g and not d.required:
            g[d.name] = d.default
    return comp.load()(MergeInputs(name="w", tensors=[x.clone() for x in xs], base=base.clone(), params=per,
                                   global_params=g))


@pytest.mark.parametrize("method,extra", [("ties", {}), ("breadcrumbs", {"gamma": 0.01})])
def test_bf16_tiebreak_disagreement_is_measured_not_rare(method, extra):
    gen = torch.Generator().manual_seed(5)
    total = differ = differ_mk_mode = 0
    for shape in [(128, 256), (256, 128)]:
        w = torch.randn(shape, generator=gen) * 0.02
        base = w.bfloat16().float()
        rms = base.square().mean().sqrt()
        xs = [(base + 0.01 * rms * torch.randn(shape, generator=gen)).bfloat16().float() for _ in range(2)]
        per = [{"weight": 0.5, "density": 0.5, **extra}] * 2
        theirs = merge_tensors([base] + xs, method, base_index=0, dtype=torch.float32,
                               parameters={"weight": [0.5, 0.5], "density": [0.5, 0.5],
                                           **{k: [v, v] for k, v in extra.items()}}).bfloat16()
        ours = _ours(method, xs, base, per, {}).bfloat16()
        mode = {"magnitude_tiebreak": "sort"} | ({"election_precision": "compute"} if method == "ties" else {})
        ours_mk = _ours(method, xs, base, per, mode).bfloat16()
        total += base.numel()
        differ += int((ours != theirs).sum())
        differ_mk_mode += int((ours_mk != theirs).sum())
    frac = differ / total
    print(f"{method}: {frac:.2%} of elements differ from mergekit")
    assert 0.02 < frac < 0.2, frac  # spec: 7-11 % for fine-tune-sized bf16 deltas
    assert differ_mk_mode == 0
