#!/usr/bin/env python
"""adaptkit merge vs mergekit 0.1.5, side by side in one run, on three ~374M-parameter bf16 Llama checkpoints.

For each method (linear, slerp, ties, dare_ties) it runs ``mergekit-yaml`` and ``adaptkit merge`` on the same
YAML and reports wall seconds, CPU seconds (user + system of the child, from ``wait4``) and peak anonymous
memory (the high-water mark of ``RssAnon`` in ``/proc/<pid>/status``, polled every 10 ms; file-backed
pages of memory-mapped inputs are page cache, not counted), plus the floor: ``cat`` of the three inputs.
Ratios adaptkit/mergekit and adaptkit/cat are printed with the goals:

* TIES and DARE-TIES CPU-s <= 1/10 of mergekit's; linear and SLERP <= 1/3;
* every method <= 3x the ``cat`` floor in CPU seconds;
* peak anonymous memory <= 1/2 of mergekit's.

The checkpoints are random (seeded) and cached under ``--cache`` (default: ``$TMPDIR/adaptkit-bench``).
``--small`` uses ~20M-parameter models for a quick run. ``--device cuda`` runs both tools on the GPU
(mergekit ``--cuda``). Usage::

    python benchmarks/merge_vs_mergekit.py [--small] [--device cuda] [--methods ties,linear] [--json out.json]
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

SIZES = {
    # hidden, layers, intermediate, vocab, heads, kv heads
    "full": (1024, 24, 2816, 32000, 16, 16),
    "small": (256, 4, 704, 8000, 4, 4),
}
GOALS = {"linear": 1 / 3, "slerp": 1 / 3, "ties": 1 / 10, "dare_ties": 1 / 10}


def bin_of(name: str) -> str:
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        sys.exit(f"error: {name} not found (install the dev extras)")
    return found


def llama_specs(hidden: int, layers: int, inter: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    specs = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (hidden, hidden)),
            (p + "self_attn.v_proj.weight", (hidden, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    specs += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return specs


def build_models(cache: Path, size: str) -> list[Path]:
    """base, a, b: a random bf16 Llama and two fine-tune-like variants (base + 2% noise)."""
    import torch

    from adaptkit.io import ShardedWriter, TensorSpec

    hidden, layers, inter, vocab, heads, kv = SIZES[size]
    root = cache / f"llama-{size}"
    names = ["base", "a", "b"]
    paths = [root / n for n in names]
    if all((p / "model.safetensors.index.json").exists() or (p / "model.safetensors").exists() for p in paths):
        return paths
    specs = llama_specs(hidden, layers, inter, vocab)
    n_params = sum(int(torch.Size(s).numel()) for _, s in specs)
    print(f"building 3 checkpoints of {n_params / 1e6:.0f}M params (bf16) in {root} ...", file=sys.stderr)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "hidden_act": "silu", "rope_theta": 10000.0,
    }
    for mi, (name, path) in enumerate(zip(names, paths)):
        if path.exists():
            shutil.rmtree(path)
        tmp = root / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        w = ShardedWriter(tmp, [TensorSpec(n, "BF16", s) for n, s in specs], max_shard_size=2 * 2**30)
        for ti, (tname, shape) in enumerate(specs):
            g = torch.Generator().manual_seed(1000 * ti + 7)
            if len(shape) == 1:
                base = 1.0 + 0.1 * torch.randn(shape, generator=g)
            else:
                base = torch.randn(shape, generator=g) * 0.02
            if mi:
                g2 = torch.Generator().manual_seed(1000 * ti + 7 + 100_000 * mi)
                base += torch.randn(shape, generator=g2) * (0.02 * base.abs().mean())
            w.write(tname, base.to(torch.bfloat16))
            del base
        w.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tmp.rename(path)
    return paths


def configs(paths: list[Path]) -> dict[str, dict]:
    base, a, b = (str(p) for p in paths)
    return {
        "linear": {"merge_method": "linear", "dtype": "bfloat16", "models": [
            {"model": base, "parameters": {"weight": 0.4}}, {"model": a, "parameters": {"weight": 0.3}},
            {"model": b, "parameters": {"weight": 0.3}}]},
        "slerp": {"merge_method": "slerp", "base_model": base, "dtype": "bfloat16",
                  "models": [{"model": base}, {"model": a}], "parameters": {"t": 0.5}},
        "ties": {"merge_method": "ties", "base_model": base, "dtype": "bfloat16", "models": [
            {"model": a, "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": b, "parameters": {"weight": 0.5, "density": 0.5}}]},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "dtype": "bfloat16", "models": [
            {"model": a, "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": b, "parameters": {"weight": 0.5, "density": 0.5}}]},
    }


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall, CPU (user+sys via wait4) and peak RssAnon (polled)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = [0]
    done = threading.Event()

    def poll() -> None:
        path = f"/proc/{proc.pid}/status"
        while not done.is_set():
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak[0] = max(peak[0], int(line.split()[1]) * 1024)
                            break
            except OSError:
                return
            time.sleep(0.01)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    stderr = proc.stderr.read() if proc.stderr else b""
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "peak_anon": peak[0]}


def drop_dir(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="~20M-param models for a quick run")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--methods", default="linear,slerp,ties,dare_ties")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "adaptkit-bench"))
    ap.add_argument("--json", help="also write the results as JSON to this file")
    ap.add_argument("--skip-mergekit", action="store_true", help="time adaptkit (and cat) only")
    args = ap.parse_args()

    cache = Path(args.cache)
    paths = build_models(cache, "small" if args.small else "full")
    work = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=cache))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    files = [str(f) for p in paths for f in sorted(p.glob("*.safetensors"))]
    in_bytes = sum(os.path.getsize(f) for f in files)
    import yaml

    results: dict[str, dict] = {}
    try:
        measure(["cat", *files], env)  # warm the page cache: every tool then reads from memory
        results["cat"] = measure(["cat", *files], env)
        # fixed costs, for reading the table: the interpreter importing torch, and adaptkit's import + plan
        results["import_torch"] = measure([sys.executable, "-c", "import torch"], env)
        probe = work / "probe.yml"
        probe.write_text(yaml.safe_dump(configs(paths)["linear"]))
        results["adaptkit_dry_run"] = measure([bin_of("adaptkit"), "merge", str(probe), str(work / "probe"),
                                               "--dry-run"], env)
        for method in args.methods.split(","):
            cfg = configs(paths)[method]
            cfg_path = work / f"{method}.yml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            row = {}
            if not args.skip_mergekit:
                out = work / f"mk-{method}"
                cmd = [bin_of("mergekit-yaml"), str(cfg_path), str(out), "--quiet", "--no-copy-tokenizer",
                       "--random-seed", "0"]
                if args.device == "cuda":
                    cmd.append("--cuda")
                print(f"running mergekit {method} ...", file=sys.stderr, flush=True)
                row["mergekit"] = measure(cmd, env)
                drop_dir(out)
            out = work / f"ak-{method}"
            cmd = [bin_of("adaptkit"), "merge", str(cfg_path), str(out), "-q", "--device", args.device]
            print(f"running adaptkit {method} ...", file=sys.stderr, flush=True)
            row["adaptkit"] = measure(cmd, env)
            drop_dir(out)
            results[method] = row
    finally:
        drop_dir(work)

    cat = results["cat"]
    size = "small" if args.small else "full"
    print(f"\nmerge benchmark ({size}: 3 inputs, {in_bytes / 2**20:.0f} MiB in all, device {args.device}, "
          f"{os.cpu_count()} CPUs)")
    print(f"cat floor: wall {cat['wall']:.2f} s, CPU {cat['cpu']:.2f} s")
    print(f"fixed costs: python -c 'import torch' {results['import_torch']['cpu']:.2f} CPU-s; "
          f"adaptkit merge --dry-run {results['adaptkit_dry_run']['cpu']:.2f} CPU-s\n")
    hdr = (f"{'method':10s} {'tool':9s} {'wall s':>8s} {'CPU s':>8s} {'anon MiB':>9s}   "
           f"{'CPU ak/mk':>9s} {'anon ak/mk':>10s} {'CPU ak/cat':>10s}  goals")
    print(hdr)
    print("-" * len(hdr))
    for method, row in results.items():
        if method not in GOALS:
            continue
        ak = row["adaptkit"]
        mk = row.get("mergekit")
        if mk:
            print(f"{method:10s} {'mergekit':9s} {mk['wall']:8.2f} {mk['cpu']:8.2f} {mk['peak_anon'] / 2**20:9.0f}")
        r_cpu = ak["cpu"] / mk["cpu"] if mk else float("nan")
        r_mem = ak["peak_anon"] / mk["peak_anon"] if mk and mk["peak_anon"] else float("nan")
        r_cat = ak["cpu"] / cat["cpu"] if cat["cpu"] else float("nan")
        goals = []
        if mk:
            goals.append(f"CPU<={GOALS[method]:.2g}x:{'ok' if r_cpu <= GOALS[method] else 'MISS'}")
            goals.append(f"mem<=0.5x:{'ok' if r_mem <= 0.5 else 'MISS'}")
        goals.append(f"<=3x cat:{'ok' if r_cat <= 3 else 'MISS'}")
        row["ratios"] = {"cpu_vs_mergekit": r_cpu, "anon_vs_mergekit": r_mem, "cpu_vs_cat": r_cat}
        print(f"{'' if mk else method:10s} {'adaptkit':9s} {ak['wall']:8.2f} {ak['cpu']:8.2f} {ak['peak_anon'] / 2**20:9.0f}   "
              f"{r_cpu:9.3f} {r_mem:10.3f} {r_cat:10.2f}  {' '.join(goals)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "device": args.device, "input_bytes": in_bytes,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
