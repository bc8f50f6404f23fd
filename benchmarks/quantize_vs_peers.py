"""adaptkit gptq vs GPTQModel and adaptkit awq vs AutoAWQ: time and quality on the same model and the same
calibration token ids, in one run.

    python benchmarks/quantize_vs_peers.py [--model DIR] [--nsamples 16] [--seqlen 256] [--group-size 64]
                                           [--calib builtin] [--peers gptqmodel,autoawq] [--threads N]
                                           [--sentences 200] [--peer-python .venv-interop/bin/python]

* calibration: adaptkit's ``--calib`` windows (seeded) are computed once; adaptkit draws the very same
  windows (same source, seed, sizes) and the peers get them as token ids;
* adaptkit: ``adaptkit.quantize.runner.run_quantize(..., method="gptq"|"awq")`` writes a GPTQ v1 / AWQ GEMM checkpoint (the full CLI
  path, timed from the call to the renamed output folder);
* the peers run in their own venv (``.venv-interop``, ``make test-interop`` builds it) as subprocesses:
  GPTQModel (``GPTQModel.load(...).quantize(...)``, then ``save``; ``GPTQMODEL_CPU_WORKERS`` = threads) and
  AutoAWQ (``benchmarks/peer_autoawq.py``); each times its own quantize+save, imports excluded;
* the same number of torch threads for everyone (default: all cores);
* quality: every checkpoint is read back by adaptkit's loader (dequantized) and scored by the same
  evaluator as ``benchmarks/quant_quality.py`` (bits-per-byte on FLORES+ English, top-1 agreement with the
  unquantized model).

Prints all rows and the ratios adaptkit/peer (time: lower is better; Δbpb: lower is better).
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


def run_peer(name: str, cmd: list[str], env: dict[str, str]) -> dict | None:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PEER_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        print(f"peer {name} failed (rc={proc.returncode}):\n  " + "\n  ".join(tail), flush=True)
        return None
    res = json.loads(line[len("PEER_RESULT "):])
    res["wall"] = wall
    print(f"{name} {res['version']}: {res['seconds']:.1f}s (process wall {wall:.1f}s, import {res['import_s']:.1f}s)",
          flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--calib", default="builtin")
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--peers", default="gptqmodel,autoawq")
    ap.add_argument("--peer-python", default=str(ROOT / ".venv-interop" / "bin" / "python"))
    ap.add_argument("--calib-ids", default=None, metavar="FILE.json",
                    help="use these calibration windows (a JSON list of token-id lists) for everyone instead of --calib")
    ap.add_argument("--methods", default="gptq,awq", help="adaptkit methods to run (gptq, awq)")
    ap.add_argument("--gptq-group-order", default="gar", choices=("natural", "gar"),
                    help="adaptkit gptq -o group_order (default gar: what GPTQModel 7.x does by default, act_group_aware)")
    ap.add_argument("--extra", action="append", default=[], metavar="LABEL=DIR[@SECONDS]",
                    help="also score an existing quantized folder (e.g. a peer run made earlier on the same ids)")
    ap.add_argument("--keep", default=None, help="keep all outputs under this folder")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(HERE))
    import quant_quality as qq

    from adaptkit.quantize import calib
    from adaptkit.formats.quantized import open_quantized
    from adaptkit.quantize.runner import run_quantize

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
        calib, nsamples, seqlen, seed = args.calib, args.nsamples, args.seqlen, 0

    if args.calib_ids:
        ids = torch.tensor(json.loads(Path(args.calib_ids).read_text()), dtype=torch.int64)
        args.nsamples, args.seqlen = ids.shape
        args.calib = f"ids from {args.calib_ids}"
        fixed = ids.clone()
        calib.calibration_ids = lambda _req, _tok: fixed.clone()  # adaptkit's quantizers take these windows too
    else:
        ids = calib.calibration_ids(Req, tok)
    ids_file = work / "calib_ids.json"
    ids_file.write_text(json.dumps(ids.tolist()))
    print(f"model {model_dir.name}; calibration {args.calib} {args.nsamples}x{args.seqlen}; "
          f"{args.bits}-bit g{args.group_size} damp={args.damp}; threads={args.threads}", flush=True)
    have_peer_python = Path(args.peer_python).exists()
    if peers and not have_peer_python:
        print(f"peers: {args.peer_python} not found (make test-interop builds .venv-interop); skipping the peers")
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS=str(args.threads), BENCH_THREADS=str(args.threads),
               PYTHONWARNINGS="ignore")

    def adaptkit_run(method: str, out: Path, sym: bool) -> float:
        options = {"group_order": args.gptq_group_order} if method == "gptq" else None
        # awq always writes a zero-point grid and takes neither --sym nor --damp: pass only what it accepts
        common = {"sym": sym, "damp": args.damp} if method == "gptq" else {}
        t = time.perf_counter()
        run_quantize(model_dir, out, method=method, bits=args.bits, group_size=args.group_size, **common,
                     calib="builtin" if args.calib_ids else args.calib, nsamples=args.nsamples,
                     seqlen=args.seqlen, seed=0, force=True, options=options)
        secs = time.perf_counter() - t
        print(f"adaptkit {method}: {secs:.1f}s", flush=True)
        return secs

    runs = []  # (label, pair, seconds, folder)
    if "gptq" in methods:
        runs.append((f"adaptkit gptq (group_order={args.gptq_group_order})", "gptq",
                     adaptkit_run("gptq", work / "adaptkit-gptq", True), work / "adaptkit-gptq"))
    if "gptqmodel" in peers and have_peer_python:
        out_p = work / "gptqmodel-gptq"
        res = run_peer("GPTQModel", [args.peer_python, "-c", PEER_SCRIPT, str(model_dir), str(out_p), str(ids_file),
                                     str(args.bits), str(args.group_size), str(args.damp)], env)
        if res:
            runs.append((f"GPTQModel {res['version']} gptq (defaults: act_group_aware)", "gptq", res["seconds"], out_p))
    if "awq" in methods:
        runs.append(("adaptkit awq", "awq", adaptkit_run("awq", work / "adaptkit-awq", False), work / "adaptkit-awq"))
    if "autoawq" in peers and have_peer_python:
        out_p = work / "autoawq-awq"
        res = run_peer("AutoAWQ", [args.peer_python, str(HERE / "peer_autoawq.py"), str(model_dir), str(out_p),
                                   str(ids_file), "--w-bit", str(args.bits), "--group-size", str(args.group_size),
                                   "--threads", str(args.threads)], env)
        if res:
            runs.append((f"AutoAWQ {res['version']} awq", "awq", res["seconds"], out_p))

    for spec in args.extra:
        label, _, rest = spec.partition("=")
        folder, _, secs = rest.partition("@")
        pair = "awq" if "awq" in label.lower() else "gptq"
        runs.append((label, pair, float(secs) if secs else None, Path(folder)))

    # -- quality ---------------------------------------------------------------------------------------------
    sentences = qq.flores_english(args.sentences)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}
    fp_bpb, fp_pred, _ = qq.evaluate(model, tok, sentences)

    def score(folder: Path):
        qc = open_quantized(folder)
        try:
            items = [(n, qc.get(n).float()) for n in qc.dequantized_names]
            extra = [(n, qc.get(n).float()) for n in qc.names() if n not in set(qc.dequantized_names)
                     and n in fp_state and not n.endswith(("qweight", "qzeros", "scales", "g_idx"))]
        finally:
            qc.close()
        # AWQ folds its scales into norms/biases: take every float tensor of the checkpoint, not only the linears
        qq.apply_items(model, items + extra, fp_state)
        bpb, _, agree = qq.evaluate(model, tok, sentences, fp_pred)
        return bpb, agree

    rows = [("fp32 (reference)", "", None, fp_bpb, 1.0)]
    for label, pair, secs, folder in runs:
        bpb, agree = score(folder)
        rows.append((label, pair, secs, bpb, agree))
    print()
    print(f"| quantizer | time (s, {args.threads} threads) | bits/byte (FLORES+ eng) | Δ vs fp32 | top-1 agreement |")
    print("|---|---|---|---|---|")
    for name, _pair, secs, bpb, agree in rows:
        print(f"| {name} | {'-' if secs is None else f'{secs:.1f}'} | {bpb:.4f} | {bpb - fp_bpb:+.4f} | {agree:.2%} |")
    print()
    for pair in ("gptq", "awq"):
        ours = [r for r in rows if r[1] == pair and r[0].startswith("adaptkit")]
        theirs = [r for r in rows if r[1] == pair and not r[0].startswith("adaptkit")]
        if ours and theirs:
            a, p = ours[0], theirs[0]
            ratio = f"{a[2] / p[2]:.2f}x" if p[2] else "n/a"
            print(f"{pair}: time ratio adaptkit/{p[0].split()[0]} {ratio} (< 1: adaptkit faster); "
                  f"Δbpb ratio {(a[3] - fp_bpb) / (p[3] - fp_bpb):.2f}x (< 1: adaptkit loses less); "
                  f"top-1 {a[4]:.2%} vs {p[4]:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
