"""GPTQ seconds per decoder layer on a ~1B-parameter Llama-shaped model (issue #4 item 7; for the GPU machine).

    python benchmarks/gptq_cuda_timing.py [--device cuda] [--layers 4] [--hidden 2048] [--intermediate 5632]
                                          [--nsamples 128] [--seqlen 512] [--json OUT.json]

Builds a random Llama with TinyLlama-1.1B's layer shape (hidden 2048, intermediate 5632, 32 heads, 4 kv heads,
bf16 weights) but only ``--layers`` decoder layers, in a temporary folder (``adaptkit.testing.tiny``: nothing
is downloaded), and times ``adaptkit quantize --method gptq`` (4-bit, g128, sym, builtin calibration) on it
through the Python API. Prints the wall time, the time spent before layer 0 (loading, tokenizing, catching
the calibration inputs) and the seconds per layer, i.e. what a 22-layer 1.1B model would take per layer.
Runs on CPU too (slowly; use small --hidden/--layers to try it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=4, help=">= 2 (the per-layer time is the spacing of layer ends)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from adaptkit.testing.tiny import make_tiny_llama
    from adaptkit.quantize.runner import run_quantize

    with tempfile.TemporaryDirectory(prefix="adaptkit-gptq-timing-") as tmp:
        model = make_tiny_llama(Path(tmp) / "model", hidden_size=args.hidden, intermediate_size=args.intermediate,
                                num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                                dtype="bfloat16", max_position_embeddings=max(256, args.seqlen))
        marks: list[tuple[float, str]] = []

        def progress(msg: str) -> None:
            marks.append((time.perf_counter(), msg))

        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run_quantize(model, Path(tmp) / "q", method="gptq", bits=4, group_size=args.group_size, sym=True,
                     act_order=args.act_order, calib="builtin", nsamples=args.nsamples, seqlen=args.seqlen,
                     device=args.device, progress=progress)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
    # the last progress line of each layer marks its end; per layer = spacing of those ends
    ends = [max((t for t, m in marks if m.startswith(f"layer {i}/{args.layers} ")), default=float("nan"))
            for i in (1, args.layers)]
    per_layer = (ends[1] - ends[0]) / (args.layers - 1) if args.layers > 1 else ends[0] - t0
    first = ends[0] - t0 - per_layer  # loading, tokenizing, catching the calibration inputs
    params = args.layers * (4 * args.hidden * args.hidden * (1 + args.kv_heads / args.heads) / 2
                            + 3 * args.hidden * args.intermediate)
    res = dict(device=args.device, device_name=(torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"),
               layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, linear_params=params,
               calib=f"{args.nsamples}x{args.seqlen}", total_s=total, before_first_layer_s=first,
               s_per_layer=per_layer, torch=torch.__version__)
    print(f"gptq on {res['device_name']}: {args.layers} layers of hidden {args.hidden}/intermediate {args.intermediate}, "
          f"calibration {res['calib']}: total {total:.1f}s, setup {first:.1f}s, {per_layer:.2f} s/layer "
          f"(a 22-layer 1.1B model: ~{first + 22 * per_layer:.0f}s)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
