"""Non-padding tokens/s of ``adaptkit train`` vs a hand-written TRL ``SFTTrainer`` + PEFT script.

Same model, data, LoRA adapter and settings on both sides (packing on: TRL's best-fit packing, padding-free),
each in a fresh process; the timed window is ``trainer.train()`` on both sides, and tokens are counted the
same way (the real tokens of every training batch). Goal: ratio >= 1.0 (adaptkit's layer costs nothing).

Three sides, run in rotating order (each repeat starts with a different one, so the first, colder run of a
round does not always fall on the same side):
* ``adaptkit``: ``adaptkit train`` as shipped (``compact_lm_head`` on: the LM head only at label-carrying
  positions, where TRL's CPU path scores every position);
* ``adaptkit-layer``: the same with ``compact_lm_head: false`` -- TRL's own kernels under adaptkit's layer,
  which shows what the layer itself costs;
* ``trl``: the hand-written TRL script.

    python benchmarks/train_vs_trl.py                      # SmolLM2-135M-Instruct if installed, else a tiny Llama
    python benchmarks/train_vs_trl.py --base PATH --steps 20 --repeats 3

Not measured here: Liger's Triton kernels and GPU MFU (``benchmarks/gpu_check.sh`` on a lent GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BASELINE = textwrap.dedent('''
    import json, sys, time
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    a = json.loads(sys.argv[1])
    rows = [json.loads(x) for x in open(a["data"], encoding="utf-8")]

    def real_tokens(inputs):  # the same count adaptkit uses (non-padding tokens of the batch)
        if "attention_mask" in inputs:
            return int(inputs["attention_mask"].sum())
        pos = inputs.get("position_ids")
        if pos is not None:
            return sum(int(r.ne(0).nonzero().max()) + 1 for r in pos if r.ne(0).any())
        return int(inputs["input_ids"].numel())

    class Measured(SFTTrainer):
        tokens = 0

        def training_step(self, model, inputs, *args, **kwargs):
            self.tokens += real_tokens(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

    torch.manual_seed(a["seed"])
    tok = AutoTokenizer.from_pretrained(a["base"])
    model = AutoModelForCausalLM.from_pretrained(a["base"], dtype=torch.float32)
    cfg = SFTConfig(output_dir=a["tmp"], max_steps=a["steps"], per_device_train_batch_size=a["batch"],
                    learning_rate=a["lr"], lr_scheduler_type="constant", max_length=a["seq"], packing=a["packing"],
                    bf16=False, gradient_checkpointing=False, use_cpu=True, logging_steps=1, report_to="none",
                    save_strategy="no", seed=a["seed"], data_seed=a["seed"], disable_tqdm=True,
                    dataloader_num_workers=0)
    lora = LoraConfig(r=a["r"], lora_alpha=2 * a["r"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = Measured(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                       peft_config=lora)
    t0 = time.perf_counter()
    trainer.train()
    dt = time.perf_counter() - t0
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(json.dumps({"tokens": trainer.tokens, "seconds": dt, "losses": losses}))
''')


def _rows(n: int) -> list[dict]:
    """Conversational prompt/completion rows from the analogy task (tiny arithmetic rows if gensim is absent)."""
    sys.path.insert(0, str(ROOT / "examples" / "train"))
    try:
        import analogy

        qs = analogy.load_questions()[:n]
        rows = [analogy.row(q)["messages"] for q in qs]
    except (ImportError, FileNotFoundError):
        rows = [[{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}]
                for i in range(n)]
    return [{"prompt": m[:1], "completion": m[1:]} for m in rows]


def _default_base(tmp: Path) -> Path:
    try:
        from adaptkit.testing.realmodel import smollm2_path

        return smollm2_path()
    except Exception:  # noqa: BLE001 - the real model is optional here
        from adaptkit.testing.tiny import make_tiny_llama

        return make_tiny_llama(tmp / "tiny", hidden_size=256, num_layers=4, intermediate_size=512)


def run_adaptkit(a: dict, tmp: Path, env: dict, compact: bool = True) -> dict:
    import yaml

    recipe = tmp / "bench.yml"
    recipe.write_text(yaml.safe_dump({
        "base": str(a["base"]), "method": "sft", "data": {"train": a["data"], "format": "prompt_completion"},
        "adapter": {"kind": "lora", "r": a["r"], "alpha": 2 * a["r"], "target_modules": "all-linear"},
        "training": {"max_steps": a["steps"], "batch_size": a["batch"], "learning_rate": a["lr"],
                     "lr_scheduler": "constant", "max_seq_len": a["seq"], "packing": a["packing"],
                     "compact_lm_head": compact},
        "seed": a["seed"], "device": "cpu"}))
    out = tmp / "adaptkit-out"
    r = subprocess.run([sys.executable, "-m", "adaptkit", "train", str(recipe), "--output", str(out), "--force",
                        "-q", "--json"], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"adaptkit train failed:\n{r.stderr[-3000:]}")
    doc = json.loads((out / "adaptkit.json").read_text())
    losses = [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines() if '"loss"' in x]
    return {"tokens": doc["result"]["tokens"], "seconds": doc["result"]["seconds"], "losses": losses}


def run_trl(a: dict, tmp: Path, env: dict) -> dict:
    script = tmp / "baseline_trl.py"
    script.write_text(BASELINE)
    args = dict(a, base=str(a["base"]), tmp=str(tmp / "trl-out"))
    r = subprocess.run([sys.executable, str(script), json.dumps(args)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"TRL baseline failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="model folder (default: SmolLM2-135M-Instruct, else a tiny Llama)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256, help="max_length (packed sequence length)")
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--no-packing", dest="packing", action="store_false")
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs per side (median reported)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="adaptkit-bench-train-") as t:
        tmp = Path(t)
        base = Path(args.base) if args.base else _default_base(tmp)
        data = tmp / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in _rows(args.rows)))
        a = {"base": base, "data": str(data), "steps": args.steps, "batch": args.batch, "seq": args.seq,
             "r": args.r, "lr": args.lr, "packing": args.packing, "seed": 0}
        sides = {"adaptkit": lambda: run_adaptkit(a, tmp, env, compact=True),
                 "adaptkit-layer": lambda: run_adaptkit(a, tmp, env, compact=False),
                 "trl": lambda: run_trl(a, tmp, env)}
        names = list(sides)
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for rep in range(args.repeats):
            for n in names[rep % 3:] + names[:rep % 3]:  # rotating order
                runs[n].append(sides[n]())
    tps = {n: statistics.median(r["tokens"] / r["seconds"] for r in rs) for n, rs in runs.items()}
    first = {n: rs[0] for n, rs in runs.items()}
    same = lambda x, y: len(x) == len(y) and all(abs(p - q) <= 1e-3 * max(1.0, abs(q)) for p, q in zip(x, y))  # noqa: E731
    doc = {"base": str(base), "steps": args.steps, "batch": args.batch, "seq": args.seq, "packing": args.packing,
           "repeats": args.repeats, "load_average": round(os.getloadavg()[0], 2),
           "tokens": {n: r["tokens"] for n, r in first.items()},
           "tokens_per_s": {n: round(v, 1) for n, v in tps.items()},
           "ratio": round(tps["adaptkit"] / tps["trl"], 3),
           "layer_ratio": round(tps["adaptkit-layer"] / tps["trl"], 3),
           "runs_tokens_per_s": {n: [round(r["tokens"] / r["seconds"], 1) for r in rs] for n, rs in runs.items()},
           "same_losses": same(first["adaptkit"]["losses"], first["trl"]["losses"])
           and same(first["adaptkit-layer"]["losses"], first["trl"]["losses"])}
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"base {doc['base']}: {args.steps} steps x batch {args.batch}, max_length {args.seq}, packing {args.packing}, "
          f"{args.repeats} repeat(s), load average {doc['load_average']}")
    print(f"tokens per run: {doc['tokens']}; same loss curve on all sides: {doc['same_losses']}")
    print(f"{'side':<16} {'tokens/s (median)':>18}   per run")
    for n in names:
        print(f"{n:<16} {doc['tokens_per_s'][n]:>18}   {doc['runs_tokens_per_s'][n]}")
    print(f"ratio adaptkit / TRL: {doc['ratio']}   (layer alone, TRL's kernels: {doc['layer_ratio']})")

if __name__ == "__main__":
    main()
