"""adaptkit gptq vs GPTQModel: time and quality on the same model and the same calibration token ids.

    python benchmarks/quantize_vs_peers.py [--model DIR] [--nsamples 16] [--seqlen 256] [--group-size 64]
                                           [--sentences 200] [--peer-python .venv-interop/bin/python]

* calibration: adaptkit's ``--calib builtin`` windows (seeded) are computed once and handed, as token ids,
  to both quantizers;
* adaptkit: ``run_quantize(..., method="gptq")`` writes a GPTQ v1 checkpoint (the full CLI path);
* the peer: GPTQModel (``GPTQModel.load(...).quantize(...)``, then ``save``) runs in its own venv
  (``make``-independent: ``.venv-interop``, created by hand with ``pip install gptqmodel torch==2.13.0``;
  GPTQModel needs ``GPTQMODEL_CPU_WORKERS=2`` on a 2-core machine) as a subprocess, timed the same way;
* quality: both checkpoints are read back by adaptkit's loader (dequantized) and scored by the same
  evaluator as ``benchmarks/quant_quality.py`` (bits-per-byte on FLORES+ English, top-1 agreement with the
  unquantized model).

Prints both rows and the ratios adaptkit/peer (time: lower is better; Δbpb: lower is better).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

PEER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    t0 = time.perf_counter()
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from gptqmodel import GPTQModel, QuantizeConfig
    model_dir, out_dir, ids_file, bits, gs, damp = sys.argv[1:7]
    ids = json.load(open(ids_file))
    cfg = QuantizeConfig(bits=int(bits), group_size=int(gs), desc_act=False, sym=True, damp_percent=float(damp))
    t1 = time.perf_counter()
    m = GPTQModel.load(model_dir, cfg, device="cpu")
    m.quantize([{"input_ids": r, "attention_mask": [1] * len(r)} for r in ids], batch_size=1)
    m.save(out_dir)
    t2 = time.perf_counter()
    import gptqmodel
    print("PEER_RESULT " + json.dumps({"seconds": t2 - t1, "import_s": t1 - t0, "version": gptqmodel.__version__}))
    """
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peer-python", default=str(ROOT / ".venv-interop" / "bin" / "python"))
    ap.add_argument("--keep", default=None, help="keep both outputs under this folder")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(HERE))
    import quant_quality as qq

    from adaptkit_quant import calib
    from adaptkit_quant.driver import run_quantize
    from adaptkit_quant.loader import open_quantized

    torch.set_num_threads(args.threads)
    if args.model is None:
        from adaptkit.testing.realmodel import smollm2_path

        model_dir = smollm2_path()
    else:
        model_dir = Path(args.model)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="adaptkit-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)

    class Req:
        calib, nsamples, seqlen, seed = "builtin", args.nsamples, args.seqlen, 0

    ids = calib.calibration_ids(Req, tok)
    ids_file = work / "calib_ids.json"
    ids_file.write_text(json.dumps(ids.tolist()))
    print(f"model {model_dir.name}; calibration builtin {args.nsamples}x{args.seqlen}; "
          f"{args.bits}-bit g{args.group_size} sym damp={args.damp}; threads={args.threads}", flush=True)

    # -- adaptkit ------------------------------------------------------------------------------------------
    out_a = work / "adaptkit-gptq"
    t = time.perf_counter()
    run_quantize(model_dir, out_a, method="gptq", bits=args.bits, group_size=args.group_size, sym=True,
                 damp=args.damp, calib="builtin", nsamples=args.nsamples, seqlen=args.seqlen, seed=0, force=True)
    t_ad = time.perf_counter() - t
    print(f"adaptkit gptq: {t_ad:.1f}s", flush=True)

    # -- the peer ------------------------------------------------------------------------------------------
    out_p = work / "gptqmodel-gptq"
    peer = None
    if not Path(args.peer_python).exists():
        print(f"peer: {args.peer_python} not found (create .venv-interop with gptqmodel); skipping the peer")
    else:
        env = dict(os.environ, GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"),
                   BENCH_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
        t = time.perf_counter()
        proc = subprocess.run(
            [args.peer_python, "-c", PEER_SCRIPT, str(model_dir), str(out_p), str(ids_file), str(args.bits),
             str(args.group_size), str(args.damp)],
            capture_output=True, text=True, env=env,
        )
        wall = time.perf_counter() - t
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PEER_RESULT ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            print(f"peer GPTQModel failed (rc={proc.returncode}):\n  " + "\n  ".join(tail))
        else:
            peer = json.loads(line[len("PEER_RESULT "):])
            peer["wall"] = wall
            print(f"GPTQModel {peer['version']} gptq: {peer['seconds']:.1f}s (process wall {wall:.1f}s, "
                  f"import {peer['import_s']:.1f}s)", flush=True)

    # -- quality ---------------------------------------------------------------------------------------------
    sentences = qq.flores_english(args.sentences)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}
    fp_bpb, fp_pred, _ = qq.evaluate(model, tok, sentences)

    def score(folder: Path):
        qc = open_quantized(folder)
        try:
            items = [(n, qc.get(n).float()) for n in qc.dequantized_names]
        finally:
            qc.close()
        qq.apply_items(model, items, fp_state)
        bpb, _, agree = qq.evaluate(model, tok, sentences, fp_pred)
        return bpb, agree

    rows = [("fp32 (reference)", None, fp_bpb, 1.0)]
    bpb_a, agree_a = score(out_a)
    rows.append(("adaptkit gptq", t_ad, bpb_a, agree_a))
    if peer is not None:
        bpb_p, agree_p = score(out_p)
        rows.append((f"GPTQModel {peer['version']} gptq", peer["seconds"], bpb_p, agree_p))
    print()
    print("| quantizer | time (s) | bits/byte (FLORES+ eng) | Δ vs fp32 | top-1 agreement |")
    print("|---|---|---|---|---|")
    for name, secs, bpb, agree in rows:
        print(f"| {name} | {'-' if secs is None else f'{secs:.1f}'} | {bpb:.4f} | {bpb - fp_bpb:+.4f} | {agree:.2%} |")
    if peer is not None:
        print()
        print(f"time ratio adaptkit/GPTQModel: {t_ad / peer['seconds']:.2f}x (< 1 means adaptkit is faster)")
        d_a, d_p = bpb_a - fp_bpb, bpb_p - fp_bpb
        print(f"Δbpb ratio adaptkit/GPTQModel: {d_a / d_p:.2f}x (< 1 means adaptkit loses less quality)")
        print(f"top-1 agreement: adaptkit {agree_a:.2%} vs GPTQModel {agree_p:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
