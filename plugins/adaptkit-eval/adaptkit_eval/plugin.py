"""The ``adaptkit`` entry point of adaptkit-eval: registers the evaluators ``perplexity``, ``lmeval``,
``probes`` and ``agreement``.

Imports nothing heavy: implementations are named lazily (``"module:function"``); metric and parameter
declarations live in light modules.
"""
from __future__ import annotations

from adaptkit import hookimpl
from adaptkit.registry import Evaluator
from adaptkit_eval import agreement, lmeval, perplexity, probes

EVALUATORS = (
    Evaluator(
        name="perplexity",
        impl="adaptkit_eval.perplexity:evaluate",
        description="bits per byte and token perplexity of text tasks (batched rolling windows, length-sorted)",
        metrics=perplexity.METRICS,
        params=perplexity.PARAMS,
    ),
    Evaluator(
        name="lmeval",
        impl="adaptkit_eval.lmeval:evaluate",
        description="lm-eval tasks in-process on the loaded model (HFLM), shipped tasks only, offline, no cache",
        metrics=lmeval.METRICS,
        params=lmeval.PARAMS,
    ),
    Evaluator(
        name="probes",
        impl="adaptkit_eval.probes:evaluate",
        description="greedy generations from a prompt file checked by exact match, regex or JSON schema",
        metrics=probes.METRICS,
        params=probes.PARAMS,
        generates=True,
    ),
    Evaluator(
        name="agreement",
        impl="adaptkit_eval.agreement:evaluate",
        description="top-1 agreement and KL divergence of next-token distributions against a baseline",
        metrics=agreement.METRICS,
        params=agreement.PARAMS,
        needs_baseline=True,
        same_tokenizer=True,
    ),
)


@hookimpl
def adaptkit_register_evaluators(registry):  # noqa: ANN001 - pluggy passes the EvaluatorRegistry
    for ev in EVALUATORS:
        registry.register(ev)
