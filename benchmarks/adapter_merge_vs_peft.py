#!/usr/bin/env python
"""adaptkit merge-adapter vs PEFT (load base, PeftModel, merge_and_unload, save_pretrained), side by side in one
run, on a ~374M-parameter random bf16 Llama with an r=16 all-linear LoRA (B random, so the merge does work);
plus extract-lora: randomized vs exact SVD.

Each tool runs in its own subprocess (imports included) under ``/usr/bin/time -v``; the inputs are built by
another child, so the measuring process never holds torch. Reported per run: wall seconds, CPU seconds (user +
system), peak RSS ("Maximum resident set size": it includes torch's shared-library pages, about the same for
both tools) and peak anonymous memory (high-water mark of ``RssAnon`` in ``/proc/<pid>/status`` polled every
10 ms: memory-mapped input pages are page cache, shared and reclaimable, and are counted in RSS but not here).

Goals: adaptkit >= 3x faster (wall) and <= 1/3 of PEFT's peak memory. The outputs are compared: share of
bit-identical tensors elements, and each tool's largest error against a float64 reference ``W + s B A`` rounded
once to bf16 (PEFT adds a bf16-rounded delta to the bf16 weight: two roundings).

Extraction: ``adaptkit extract-lora`` of the merged model (exactly rank 16 up to bf16 rounding) at rank 16, and,
per matrix, randomized (``torch.svd_lowrank``, oversample 10, 2 power iterations) vs exact SVD on a 2816x1024 and
a 1024x1024 delta with a slowly decaying spectrum (s_i ~ i^-0.5): seconds and relative error at rank 32.

Checkpoints are cached under ``--cache`` (default ``$TMPDIR/adaptkit-bench-adapters``). ``--small``: ~20M
parameters for a quick check. The machine may be shared: note the load average printed with the results.

    python benchmarks/adapter_merge_vs_peft.py [--small] [--json out.json] [--no-extract]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see adaptkit.adapters.tune_openmp

SIZES = {
    # hidden, layers, intermediate, vocab, heads, kv heads
    "full": (1024, 24, 2816, 32000, 16, 16),
    "small": (256, 4, 704, 8000, 4, 4),
}
RANK = 16

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out)
"""


TIME = "/usr/bin/time"


def _child_of(pid: int) -> int | None:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``cmd`` under ``/usr/bin/time -v``: wall and CPU seconds, maximum RSS, and peak RssAnon (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([TIME, "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak_anon = [0]
    done = threading.Event()

    def poll() -> None:
        child = None
        while not done.is_set():
            child = child or _child_of(proc.pid)
            if child:
                try:
                    with open(f"/proc/{child}/status") as fh:
                        for line in fh:
                            if line.startswith("RssAnon:"):
                                peak_anon[0] = max(peak_anon[0], int(line.split()[1]))
                                break
                except OSError:
                    return
            time.sleep(0.01)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    text = err.decode(errors="replace")
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:4])} ... failed:\n{text[-3000:]}")
    stats: dict[str, float] = {}
    for line in text.splitlines():
        key, _, val = line.strip().rpartition(": ")
        if key in ("User time (seconds)", "System time (seconds)", "Maximum resident set size (kbytes)"):
            stats[key] = float(val)
    return {"wall_s": wall, "cpu_s": stats["User time (seconds)"] + stats["System time (seconds)"],
            "maxrss_mib": stats["Maximum resident set size (kbytes)"] / 1024,
            "peak_anon_mib": peak_anon[0] / 1024, "stdout": out.decode()}


def setup(cache: Path, size: str) -> tuple[Path, Path]:
    """The base (bf16) and an r=16 all-linear LoRA made by PEFT with random B (cached)."""
    hidden, layers, inter, vocab, heads, kv = SIZES[size]
    base = cache / f"base-{size}"
    adapter = cache / f"lora-r{RANK}-{size}"
    if not base.exists():
        from adaptkit.testing import make_tiny_llama

        print(f"building the base ({size}) in {base} ...", file=sys.stderr)
        make_tiny_llama(base, hidden_size=hidden, num_layers=layers, intermediate_size=inter, vocab_size=vocab,
                        num_heads=heads, num_kv_heads=kv, dtype="bfloat16", max_position_embeddings=512)
    if not adapter.exists():
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        print(f"building the adapter in {adapter} ...", file=sys.stderr)
        m = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
        pm = get_peft_model(m, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
        tmp = Path(tempfile.mkdtemp(dir=cache))
        pm.save_pretrained(str(tmp))
        tmp.rename(adapter)
        del pm, m
    return base, adapter


def compare(base: Path, adapter: Path, ours: Path, peft_out: Path) -> dict[str, float]:
    """Bit-identical share between the two outputs, and each one's worst error vs a float64 reference rounded
    once to bf16 (in units of the reference tensor's max |value|)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    ad = load_file(str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    same = total = 0
    worst = {"adaptkit": 0.0, "peft": 0.0}
    exact_once = {"adaptkit": 0, "peft": 0}
    lora_elems = 0
    with safe_open(str(base / "model.safetensors"), "pt") as fb, safe_open(str(ours / "model.safetensors"), "pt") as fo:
        peft_files = sorted(peft_out.glob("*.safetensors"))
        handles = [safe_open(str(p), "pt") for p in peft_files]
        where = {k: h for h in handles for k in h.keys()}
        for name in fb.keys():
            a = fo.get_tensor(name)
            if name not in where:
                continue  # tied weights PEFT may drop
            b = where[name].get_tensor(name)
            same += int((a.view(torch.int16) == b.view(torch.int16)).sum())
            total += a.numel()
            key = f"base_model.model.{name[:-len('.weight')]}.lora_A.weight"
            if key in ad:
                w = fb.get_tensor(name).double()
                ref = (w + s * (ad[key.replace('lora_A', 'lora_B')].double() @ ad[key].double())).to(torch.bfloat16)
                den = float(ref.double().abs().max())
                for tool, t in (("adaptkit", a), ("peft", b)):
                    worst[tool] = max(worst[tool], float((t.double() - ref.double()).abs().max()) / den)
                    exact_once[tool] += int((t.view(torch.int16) == ref.view(torch.int16)).sum())
                lora_elems += a.numel()
    return {"identical_share": same / total, "adaptkit_max_rel_err": worst["adaptkit"],
            "peft_max_rel_err": worst["peft"],
            "adaptkit_rounded_once_share": exact_once["adaptkit"] / lora_elems,
            "peft_rounded_once_share": exact_once["peft"] / lora_elems}


def svd_micro(seed: int = 0) -> list[dict[str, float]]:
    """Randomized vs exact SVD at rank 32 on deltas with a slowly decaying spectrum."""
    import torch

    from adaptkit.adapters.math import low_rank_factor

    rows = []
    for shape in ((2816, 1024), (1024, 1024)):
        g = torch.Generator().manual_seed(seed)
        m, n = shape
        k = min(m, n)
        u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
        v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
        sv = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
        delta = (u * sv) @ v.T
        t = time.perf_counter()
        fr = low_rank_factor(delta, 32, seed=1)
        tr = time.perf_counter() - t
        t = time.perf_counter()
        fe = low_rank_factor(delta, 32, exact=True)
        te = time.perf_counter() - t
        rows.append({"shape": f"{m}x{n}", "randomized_s": tr, "exact_s": te, "randomized_err": fr.rel_error,
                     "exact_err": fe.rel_error, "speedup": te / tr, "err_ratio": fr.rel_error / fe.rel_error})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "adaptkit-bench-adapters")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-extract", action="store_true")
    ap.add_argument("--setup-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = "small" if args.small else "full"
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.setup_only:
        setup(args.cache, size)
        return
    # build the inputs in a child: this process must not hold torch while it measures others
    subprocess.run([sys.executable, __file__, "--setup-only", "--cache", str(args.cache),
                    *(["--small"] if args.small else [])], check=True)
    base, adapter = args.cache / f"base-{size}", args.cache / f"lora-r{RANK}-{size}"
    work = Path(tempfile.mkdtemp(dir=args.cache))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    py = sys.executable
    results: dict[str, dict] = {}
    try:
        ours = work / "adaptkit"
        results["adaptkit merge-adapter"] = measure(
            [py, "-m", "adaptkit", "merge-adapter", str(base), str(adapter), str(ours), "--json", "-q"], env)
        peft_out = work / "peft"
        results["peft merge_and_unload"] = measure([py, "-c", PEFT_SCRIPT, str(base), str(adapter), str(peft_out)], env)
        agreement = compare(base, adapter, ours, peft_out)
        extract: dict[str, object] = {}
        if not args.no_extract:
            ex = work / "extracted"
            r = measure([py, "-m", "adaptkit", "extract-lora", str(ours), str(base), str(ex), "--rank", str(RANK),
                         "--json", "-q"], env)
            doc = json.loads(r.pop("stdout"))
            results["adaptkit extract-lora (randomized)"] = r
            extract = {"modules": doc["modules"], "min_energy": doc["min_module_energy"],
                       "mean_energy": doc["mean_module_energy"], "max_rel_error": doc["max_rel_error"],
                       "svd_seconds": doc["svd_seconds"]}
            extract["svd_micro"] = svd_micro()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in results.values():
        r.pop("stdout", None)
    a, p = results["adaptkit merge-adapter"], results["peft merge_and_unload"]
    load = os.getloadavg()
    print(f"\nbase: {base} ({size}), adapter r={RANK} all-linear; load average {load[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'run':38s} {'wall s':>8s} {'cpu s':>8s} {'maxRSS MiB':>11s} {'peak anon MiB':>14s}")
    for name, r in results.items():
        print(f"{name:38s} {r['wall_s']:8.2f} {r['cpu_s']:8.2f} {r['maxrss_mib']:11.0f} {r['peak_anon_mib']:14.0f}")
    ratios = {"wall (peft / adaptkit)": p["wall_s"] / a["wall_s"],
              "cpu (peft / adaptkit)": p["cpu_s"] / a["cpu_s"],
              "maxRSS (adaptkit / peft)": a["maxrss_mib"] / p["maxrss_mib"],
              "peak anon (adaptkit / peft)": a["peak_anon_mib"] / p["peak_anon_mib"]}
    goals = {"wall (peft / adaptkit)": (">=", 3.0), "maxRSS (adaptkit / peft)": ("<=", 1 / 3),
             "peak anon (adaptkit / peft)": ("<=", 1 / 3)}
    print()
    for k, v in ratios.items():
        g = goals.get(k)
        ok = "" if g is None else ("  goal " + g[0] + f" {g[1]:.2f}: " + ("met" if (v >= g[1] if g[0] == ">=" else v <= g[1]) else "MISSED"))
        print(f"{k:32s} {v:7.2f}{ok}")
    print(f"\noutputs: {agreement['identical_share']:.4%} of elements bit-identical; max error vs float64 reference "
          f"(x max|W|): adaptkit {agreement['adaptkit_max_rel_err']:.2e}, PEFT {agreement['peft_max_rel_err']:.2e}; "
          f"rounded-once share: adaptkit {agreement['adaptkit_rounded_once_share']:.4%}, "
          f"PEFT {agreement['peft_rounded_once_share']:.4%}")
    if extract:
        print(f"\nextract-lora rank {RANK} of the merged model: {extract['modules']} modules, energy min "
              f"{extract['min_energy']:.6f} mean {extract['mean_energy']:.6f}, max rel error {extract['max_rel_error']:.2e}, "
              f"SVD {extract['svd_seconds']:.1f}s")
        print(f"{'delta':12s} {'randomized s':>13s} {'exact s':>9s} {'speedup':>8s} {'rand err':>9s} {'exact err':>10s} {'err ratio':>10s}")
        for row in extract["svd_micro"]:  # type: ignore[union-attr]
            print(f"{row['shape']:12s} {row['randomized_s']:13.3f} {row['exact_s']:9.3f} {row['speedup']:8.1f} "
                  f"{row['randomized_err']:9.4f} {row['exact_err']:10.4f} {row['err_ratio']:10.3f}")
    if args.json:
        args.json.write_text(json.dumps({"size": size, "results": results, "ratios": ratios, "agreement": agreement,
                                         "extract": extract, "loadavg": load}, indent=2))


if __name__ == "__main__":
    main()
