"""Rolling windows and batches of the perplexity engine, against lm-eval's own window functions, and
bits-per-byte against an unbatched float64 reference."""
from __future__ import annotations

import math
import random

import pytest

from adaptkit_eval import scoring


@pytest.mark.parametrize("max_len", [1, 2, 3, 7, 16])
def test_windows_match_lm_eval(max_len):
    lm_utils = pytest.importorskip("lm_eval.utils")
    rng = random.Random(max_len)
    for n in [0, 1, 2, max_len - 1, max_len, max_len + 1, 2 * max_len, 2 * max_len + 3, 37]:
        if n < 0:
            continue
        tokens = [rng.randrange(1000) for _ in range(n)]
        ref = [lm_utils.make_disjoint_window(w) for w in
               lm_utils.get_rolling_token_windows(token_list=tokens, prefix_token=-1, max_seq_len=max_len, context_len=1)]
        ours = scoring.rolling_windows(tokens, -1, max_len)
        assert len(ours) == len(ref)
        for (seq, k), (ctx, cont) in zip(ours, ref):
            full = ctx + cont  # lm-eval feeds (ctx + cont)[:-1] and scores the last len(cont) logits
            assert seq == full and k == len(cont)
        assert sum(k for _, k in ours) == n  # every token predicted exactly once


def test_batches_cover_every_window_once_within_the_budget():
    rng = random.Random(0)
    docs = [[rng.randrange(50) for _ in range(rng.randrange(1, 90))] for _ in range(300)]
    windows = scoring.make_windows(docs, 0, 32)
    batches = scoring.plan_batches(windows, batch_tokens=256, max_rows=12)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(windows)))
    for b in batches:
        width = max(windows[i].length for i in b)
        assert len(b) <= 12 and (len(b) * width <= 256 or len(b) == 1)
    padded = sum(len(b) * max(windows[i].length for i in b) for b in batches)
    assert padded <= 1.15 * sum(w.length for w in windows)  # length-sorted: little padding


@pytest.fixture
def tiny_lm(tiny_llama, adaptkit_pm):
    from adaptkit_eval import modeling

    modeling.clear()
    return modeling.load(tiny_llama(), host=adaptkit_pm)


def _reference_nll(model, docs, prefix, max_len):
    """Unbatched float64 log-likelihood with lm-eval's windows (one forward per window)."""
    import torch
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    total = []
    with torch.inference_mode():
        for d in docs:
            s = 0.0
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(d, prefix, max_len, 1)):
                inp = torch.tensor([(ctx + cont)[:-1]])
                logp = torch.log_softmax(model(input_ids=inp).logits[0].double(), -1)[-len(cont):]
                s -= float(logp.gather(1, torch.tensor(cont)[:, None]).sum())
            total.append(s)
    return total


@pytest.mark.parametrize("max_len", [8, 256])
def test_document_nll_equals_the_unbatched_reference(tiny_lm, max_len):
    pytest.importorskip("lm_eval")
    from adaptkit_eval import catalog, perplexity

    texts = catalog.text_documents(catalog.resolve("perplexity", "flores_eng"), 12)
    docs = perplexity.encode(tiny_lm.tokenizer, texts)
    prefix = tiny_lm.tokenizer.bos_token_id
    ref = _reference_nll(tiny_lm.model, docs, prefix, max_len)
    for budget in (16, 4096):
        ours = scoring.document_nll(tiny_lm.model, docs, prefix=prefix, max_len=max_len, batch_tokens=budget,
                                    max_rows=64, pad=0)
        for a, b in zip(ours, ref):
            assert math.isclose(a, b, rel_tol=2e-5, abs_tol=1e-3)


def test_models_whose_logits_are_not_the_head_output_use_the_full_forward(tiny_lm):
    import torch

    from adaptkit_eval import perplexity

    model = tiny_lm.model
    assert scoring.split_head(model) is not None
    original = model.forward

    class Scaled(torch.nn.Module):  # a wrapper whose logits are 2 x head(hidden): the split check must fail
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def forward(self, input_ids=None, **kw):
            out = original(input_ids=input_ids, **kw)
            out.logits = out.logits * 2
            return out

        def get_decoder(self):
            return self.inner.get_decoder()

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        @property
        def device(self):
            return self.inner.device

    scaled = Scaled(model)
    assert scoring.split_head(scaled) is None
    docs = perplexity.encode(tiny_lm.tokenizer, ["A short text.", "Another, somewhat longer, text to score."])
    prefix = tiny_lm.tokenizer.bos_token_id
    ours = scoring.document_nll(scaled, docs, prefix=prefix, max_len=64, batch_tokens=4096, max_rows=8)
    ref = _reference_nll(scaled, docs, prefix, 64)
    for a, b in zip(ours, ref):
        assert math.isclose(a, b, rel_tol=2e-5)
