"""Which merge settings keep each fine-tune's gain? Runs the release pipeline extended with merge variants of
the same two merged fine-tunes, each scored on both tasks; every step the release pipeline already finished is
found by its key and skipped, so only the variants run. Prints one row per merge:

    ADAPTKIT_BASE=$(python -m adaptkit.testing.realmodel) python examples/pipeline/merge_settings.py

Run it after the release pipeline (its scores of the base, the parents and its TIES merge are read from the
release's state file). The variants file is written beside the release pipeline (same relative paths, so the
same keys and the same output folder) and removed.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TASKS = ["probes:data/analogy.jsonl", "probes:data/wordforms.jsonl"]
PARENTS = ("analogy", "wordforms")


def variants() -> dict[str, dict]:
    def ties(density: float, weight: float = 1.0, dtype: str = "bfloat16") -> dict:
        return {"merge_method": "ties", "base_model": "base", "dtype": dtype,
                "models": [{"model": m, "parameters": {"weight": weight, "density": density}} for m in PARENTS],
                "parameters": {"normalize": False}}

    def task_arithmetic(weight: float = 1.0, dtype: str = "bfloat16") -> dict:
        return {"merge_method": "task_arithmetic", "base_model": "base", "dtype": dtype,
                "models": [{"model": m, "parameters": {"weight": weight}} for m in PARENTS]}

    return {
        # the same merge written in float32: the LoRA deltas are small next to the weights, and rounding the
        # merged weights to bfloat16 (8-bit mantissa) erases part of them
        "ties-d0.5-float32": ties(0.5, dtype="float32"),
        "ties-d1.0": ties(1.0),
        "task-arithmetic": task_arithmetic(),
        # each task vector scaled up: what interference and trimming take away, partly given back
        "ties-d0.5-w1.25": ties(0.5, 1.25),
        "ties-d0.5-w1.5": ties(0.5, 1.5),
        "task-arithmetic-w1.25": task_arithmetic(1.25),
        # other sparsifying / consensus methods on the same pair
        "dare-ties-d0.5": {**ties(0.5), "merge_method": "dare_ties", "parameters": {"normalize": False, "rescale": True}},
        "breadcrumbs-ties": {**ties(0.9), "merge_method": "breadcrumbs_ties",
                             "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.9, "gamma": 0.01}}
                                        for m in PARENTS]},
        "della-d0.5": {**ties(0.5), "merge_method": "della",
                       "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}}
                                  for m in PARENTS]},
        "sce": {"merge_method": "sce", "base_model": "base", "dtype": "bfloat16",
                "models": [{"model": m} for m in PARENTS], "parameters": {"select_topk": 1.0}},
    }


def main() -> int:
    doc = yaml.safe_load((HERE / "smollm2-release.yml").read_text())
    # the fine-tunes (finished by the release pipeline: found by their keys, skipped) and the variants
    steps = [s for s in doc["steps"] if "train" in s or "merge-adapter" in s]
    for name, cfg in variants().items():
        steps.append({"name": f"merge-{name}", "merge": cfg})
        steps.append({"name": f"score-merge-{name}", "eval": {"model": f"merge-{name}", "tasks": TASKS}})
    out = copy.deepcopy(doc)
    out["steps"] = steps
    tmp = HERE / ".merge-settings.yml"
    tmp.write_text(yaml.safe_dump(out, sort_keys=False))
    try:
        r = subprocess.run([sys.executable, "-m", "adaptkit", "run", str(tmp), "--json"], stdout=subprocess.PIPE,
                           env=os.environ)
    finally:
        tmp.unlink()
    if r.returncode:
        return r.returncode
    res = {s["name"]: s for s in json.loads(r.stdout)["steps"]}

    def score(step: str) -> dict[str, float]:
        doc = json.loads((Path(res[step]["output"]) / "eval.json").read_text())
        return {m["task"]: m["value"] for m in doc["metrics"]}

    # base, parents and the pipeline's TIES: scored by the release pipeline (found through its plan)
    plan = subprocess.run([sys.executable, "-m", "adaptkit", "run", str(HERE / "smollm2-release.yml"), "--dry-run",
                           "--json"], stdout=subprocess.PIPE, env=os.environ, check=True)
    res.update({s["name"]: s for s in json.loads(plan.stdout)["steps"] if s["name"].startswith("score-")})
    base = score("score-base")
    parent = {p: score(f"score-{p}") for p in PARENTS}
    gain = {p: parent[p][p] - base[p] for p in PARENTS}
    print(f"{'model':<26} {'analogy':>8} {'wordforms':>10} {'kept analogy':>13} {'kept wordforms':>15}")
    rows = [("base", "score-base"), *((f"{p} (parent)", f"score-{p}") for p in PARENTS), ("ties-d0.5 (pipeline)", "score-ties")]
    rows += [(name, f"score-merge-{name}") for name in variants()]
    for label, step in rows:
        s = score(step)
        kept = [(s[p] - base[p]) / gain[p] if gain[p] > 0 else float("nan") for p in PARENTS]
        print(f"{label:<26} {s['analogy']:>8.3f} {s['wordforms']:>10.3f} {kept[0]:>13.0%} {kept[1]:>15.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
