"""SmolLM2-135M-Instruct (slow): bits per byte equals lm-eval's HFLM on FLORES+, the shipped probes behave as
they did when they were written, agreement with itself is perfect."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.realmodel]


def test_bits_per_byte_matches_lm_eval_on_flores(smollm2, adaptkit_pm):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from adaptkit.evaluate.api import EvalRequest, TaskSpec
    from adaptkit.evaluate.runner import run_eval
    from adaptkit_eval import catalog, modeling
    from adaptkit_eval.lmeval import make_lm

    res = run_eval(EvalRequest(model=Path(smollm2), evaluator="perplexity", tasks=(TaskSpec("flores_eng"),),
                               limit=40, batch_size=16), host=adaptkit_pm)
    lm = modeling.load(smollm2, host=adaptkit_pm)
    hflm = make_lm(lm.model, lm.tokenizer, batch_size=16, max_length=2048, chunk=1 << 20, report=None)
    texts = catalog.text_documents(catalog.resolve("perplexity", "flores_eng"), 40)
    ll = hflm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)],
                                    disable_tqdm=True)
    ref = -sum(ll) / sum(len(t.encode()) for t in texts) / math.log(2)
    bpb = res.metric("bits_per_byte", "flores_eng").value
    assert abs(bpb - ref) <= 1e-4
    assert 0.8 < bpb < 2.0  # a real model, real English


def test_shipped_probes_on_smollm2(smollm2, adaptkit_pm):
    from adaptkit.evaluate.api import EvalRequest
    from adaptkit.evaluate.runner import run_eval

    res = run_eval(EvalRequest(model=Path(smollm2), evaluator="probes"), host=adaptkit_pm)
    rows = {r["id"]: r for r in res.details["probes"]["basic"]}
    assert rows["capital_france"]["passed"] and "Paris" in rows["capital_france"]["output"]
    assert rows["json_apple"]["passed"]
    assert res.metric("pass_rate", "basic").value >= 0.75


def test_agreement_with_itself(smollm2, adaptkit_pm):
    from adaptkit.evaluate.api import EvalRequest, TaskSpec
    from adaptkit.evaluate.runner import run_eval

    res = run_eval(EvalRequest(model=Path(smollm2), evaluator="agreement", tasks=(TaskSpec("flores_eng"),),
                               baseline=Path(smollm2), limit=5), host=adaptkit_pm)
    assert res.metric("top1_agreement").value == 1.0 and res.metric("kl_divergence").value < 1e-6
