"""The ``agreement`` evaluator: how closely the model's next-token distributions follow the baseline's on
the same text (same windows, same positions; the tokenizers must be identical).

Per task, over every scored position of every document:

* ``top1_agreement`` -- fraction of positions where both models' most likely next token is the same;
* ``kl_divergence``  -- mean KL(P_baseline || P_model) in nats per token (0 for identical models).

Each metric's ``baseline`` is the baseline compared with itself (1.0 and 0.0), so deltas read the same way
as every other metric's.
"""
from __future__ import annotations

import time
from typing import Any

from adaptkit.errors import ConfigError
from adaptkit.evaluate.api import EvalRequest, EvalResult, Metric, TaskSpec
from adaptkit_eval.perplexity import COMMON_PARAMS

METRICS = (("top1_agreement", True), ("kl_divergence", False))
PARAMS = COMMON_PARAMS


def default_tasks() -> tuple[TaskSpec, ...]:
    from adaptkit_eval import catalog

    return catalog.tasks_for("agreement")


def same_vocabulary(tok_a: Any, tok_b: Any) -> bool:
    return tok_a.get_vocab() == tok_b.get_vocab()


def compare(model: Any, baseline: Any, docs: list[list[int]], *, prefix: int, max_len: int, batch_tokens: int,
            max_rows: int, device: str = "cpu", pad: int = 0, progress: Any = None) -> dict[str, float]:
    """Sums over all scored positions: ``positions``, ``agree`` (top-1 matches), ``kl`` (nats)."""
    import torch

    from adaptkit_eval import scoring

    windows = scoring.make_windows(docs, prefix, max_len)
    base_iter = scoring.scored_logits(baseline, windows, batch_tokens, max_rows, device, pad)
    positions = agree = 0
    kl_total = 0.0
    for (_idx, sc_m, _t), (_idx_b, sc_b, _tb) in zip(
            scoring.scored_logits(model, windows, batch_tokens, max_rows, device, pad, progress), base_iter):
        for (_s, sel_m), (_sb, sel_b) in zip(sc_m, sc_b):
            if sel_m.shape[-1] != sel_b.shape[-1]:
                v = min(sel_m.shape[-1], sel_b.shape[-1])  # padded embedding rows beyond the shared vocabulary
                sel_m, sel_b = sel_m[:, :v], sel_b[:, :v]
            logp_m = torch.log_softmax(sel_m, dim=-1)
            logp_b = torch.log_softmax(sel_b, dim=-1)
            kl = (logp_b.exp() * (logp_b - logp_m)).sum(-1)
            kl_total += float(kl.double().sum())
            agree += int((sel_m.argmax(-1) == sel_b.argmax(-1)).sum())
            positions += int(sel_m.shape[0])
    return {"positions": positions, "agree": agree, "kl": kl_total}


def evaluate(request: EvalRequest) -> EvalResult:
    from adaptkit_eval import catalog, modeling
    from adaptkit_eval.perplexity import encode

    if request.baseline is None:
        raise ConfigError("evaluator 'agreement' compares against a baseline: give one (--baseline)")
    t0 = time.perf_counter()
    specs = [catalog.resolve("agreement", t, kinds=("text",)) for t in (request.tasks or catalog.default_for("agreement"))]
    opts = request.options
    lm = modeling.load(request.model, host=request.host, device=request.device, dtype=opts["dtype"])
    base = modeling.load(request.baseline, host=request.host, device=request.device, dtype=opts["dtype"])
    if not same_vocabulary(lm.tokenizer, base.tokenizer):
        raise ConfigError(f"baseline {request.baseline} has a different tokenizer than {request.model}: "
                          "top-1 agreement and KL compare token distributions and need the same tokenizer "
                          "(bits_per_byte does not)")
    tok = lm.tokenizer
    prefix = modeling.prefix_token_id(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else prefix
    max_len = min(modeling.max_length(lm.model, opts["max_length"]), modeling.max_length(base.model, opts["max_length"]))
    result = EvalResult(evaluator="agreement")
    result.details["loaded_with"] = {"model": lm.route, "baseline": base.route}
    for spec in specs:
        texts = catalog.text_documents(spec, request.limit)
        s = compare(lm.model, base.model, encode(tok, texts), prefix=prefix, max_len=max_len,
                    batch_tokens=opts["batch_tokens"], max_rows=max(1, request.batch_size), device=request.device,
                    pad=pad, progress=request.report)
        if not s["positions"]:
            raise ConfigError(f"task {spec.name!r}: no text to compare")
        result.metrics += [
            Metric("top1_agreement", s["agree"] / s["positions"], True, task=spec.name, baseline=1.0, n=s["positions"]),
            Metric("kl_divergence", s["kl"] / s["positions"], False, task=spec.name, baseline=0.0, n=s["positions"]),
        ]
        result.details.setdefault("tasks", {})[spec.name] = {"documents": len(texts), "positions": s["positions"]}
    result.seconds = time.perf_counter() - t0
    return result


evaluate.tasks = default_tasks  # type: ignore[attr-defined]
