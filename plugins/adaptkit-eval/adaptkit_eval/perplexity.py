"""The ``perplexity`` evaluator: bits per byte and token perplexity of text tasks (our own batched scoring,
:mod:`adaptkit_eval.scoring`).

Per task, over all its documents (``limit``: the first N):

* ``bits_per_byte``   = sum of -log2 p(token) / UTF-8 bytes of the documents (tokenizer-independent, so models
  with different tokenizers compare);
* ``token_perplexity``= exp(sum of -ln p / tokens) (tokenizer-dependent);
* ``byte_perplexity`` = exp(sum of -ln p / bytes), ``word_perplexity`` = exp(sum of -ln p / words), with
  words counted as lm-eval does (``len(re.split(r"\\s+", text))``).

Documents are tokenized without special tokens and scored after one prefix token (BOS, else EOS), exactly
as lm-eval's ``loglikelihood_rolling``. Per-document details go to ``<output>/perplexity-<task>.<model tag>.jsonl``.
"""
from __future__ import annotations

import json
import math
import re
import time
from typing import Any

from adaptkit.evaluate.api import EvalRequest, EvalResult, Metric, TaskSpec
from adaptkit.registry import Param

METRICS = (("bits_per_byte", False), ("token_perplexity", False), ("byte_perplexity", False),
           ("word_perplexity", False))

COMMON_PARAMS = (
    Param("dtype", str, "float32", scope="global", choices=("float32", "bfloat16", "float16"),
          help="compute dtype of the model (float32 on CPU: exact comparisons)"),
    Param("max_length", int, 2048, scope="global", min=2, max=1 << 20,
          help="tokens per rolling window (capped by the model's context length)"),
    Param("batch_tokens", int, 4096, scope="global", min=16, max=1 << 24,
          help="padded tokens per forward pass (windows are length-sorted, so padding is small)"),
)

PARAMS = COMMON_PARAMS


def default_tasks() -> tuple[TaskSpec, ...]:
    from adaptkit_eval import catalog

    return catalog.tasks_for("perplexity")


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [list(map(int, e)) for e in enc]


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def score_task(lm: Any, texts: list[str], *, max_length: int, batch_tokens: int, max_rows: int, device: str,
               progress: Any = None) -> dict[str, Any]:
    """Totals for one task: nll (nats), tokens, bytes, words, and per-document rows."""
    from adaptkit_eval import modeling, scoring

    tok = lm.tokenizer
    docs = encode(tok, texts)
    prefix = modeling.prefix_token_id(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else prefix
    max_len = modeling.max_length(lm.model, max_length)
    nll = scoring.document_nll(lm.model, docs, prefix=prefix, max_len=max_len, batch_tokens=batch_tokens,
                               max_rows=max_rows, device=device, pad=pad, progress=progress)
    rows = [{"doc": i, "tokens": len(d), "bytes": len(t.encode("utf-8")), "words": count_words(t), "nll": n}
            for i, (t, d, n) in enumerate(zip(texts, docs, nll))]
    return {"nll": math.fsum(nll), "tokens": sum(len(d) for d in docs), "bytes": sum(r["bytes"] for r in rows),
            "words": sum(r["words"] for r in rows), "rows": rows, "max_length": max_len, "prefix": prefix}


def metrics_from_totals(task: str, t: dict[str, Any]) -> list[Metric]:
    nll, tokens, nbytes, words = t["nll"], t["tokens"], t["bytes"], t["words"]
    if not nbytes or not tokens:
        from adaptkit.errors import ConfigError

        raise ConfigError(f"task {task!r}: no text to score")
    return [
        Metric("bits_per_byte", nll / nbytes / math.log(2), False, task=task, n=nbytes),
        Metric("token_perplexity", math.exp(nll / tokens), False, task=task, n=tokens),
        Metric("byte_perplexity", math.exp(nll / nbytes), False, task=task, n=nbytes),
        Metric("word_perplexity", math.exp(nll / max(words, 1)), False, task=task, n=words),
    ]


def evaluate(request: EvalRequest) -> EvalResult:
    from adaptkit_eval import catalog, modeling

    t0 = time.perf_counter()
    specs = [catalog.resolve("perplexity", t, kinds=("text",)) for t in (request.tasks or catalog.default_for("perplexity"))]
    opts = request.options
    lm = modeling.load(request.model, host=request.host, device=request.device, dtype=opts["dtype"])
    result = EvalResult(evaluator="perplexity")
    result.details["loaded_with"] = lm.route
    tokens_seen = 0
    for spec in specs:
        texts = catalog.text_documents(spec, request.limit)
        totals = score_task(lm, texts, max_length=opts["max_length"], batch_tokens=opts["batch_tokens"],
                            max_rows=max(1, request.batch_size), device=request.device, progress=request.report)
        tokens_seen += totals["tokens"]
        result.metrics.extend(metrics_from_totals(spec.name, totals))
        result.details.setdefault("tasks", {})[spec.name] = {
            "documents": len(texts), "tokens": totals["tokens"], "bytes": totals["bytes"],
            "max_length": totals["max_length"], "source": spec.options.get("source", ""),
            "attribution": spec.options.get("attribution", "")}
        if request.output is not None:
            path = modeling.detail_path(request, f"perplexity-{spec.name}")
            with path.open("w", encoding="utf-8") as fh:
                for row in totals["rows"]:
                    fh.write(json.dumps(row) + "\n")
            result.artifacts[f"perplexity-{spec.name}"] = str(path)
    result.seconds = time.perf_counter() - t0
    result.details["tokens_per_second"] = tokens_seen / result.seconds if result.seconds > 0 else None
    return result


evaluate.tasks = default_tasks  # type: ignore[attr-defined]
