"""A real task for a real model, from data already installed: word analogies answered with one word.

The questions come from the word-analogy set that ships inside gensim's wheel
(``gensim/test/test_data/questions-words.txt``; gensim itself is never imported). A row asks::

    Complete the analogy with one word. Athens is to Greece as Baghdad is to ___?

and the answer is the single word ``Iraq``. ``build`` writes disjoint train/held-out splits as chat rows;
``accuracy`` generates greedily with a base (plus an optional PEFT adapter) and scores the first word of each
reply against the answer (case-insensitive; also reported: the answer anywhere in the reply). ``python examples/train/analogy.py BASE [ADAPTER]`` builds the
data under ``examples/train/data/analogy-*.jsonl`` (unless present) and prints the held-out accuracy.
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

SECTIONS = ("capital-common-countries", "family", "gram3-comparative", "gram6-nationality-adjective",
            "gram7-past-tense", "gram8-plural")
QUESTION = "Complete the analogy with one word. {a} is to {b} as {c} is to ___?"


def questions_file() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the analogy task reads gensim's test data: pip install gensim")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "test" / "test_data" / "questions-words.txt"
        if p.is_file():
            return p
    raise FileNotFoundError("gensim is installed without test/test_data/questions-words.txt")


def load_questions(sections: tuple[str, ...] = SECTIONS) -> list[tuple[str, str, str, str]]:
    out, keep = [], False
    for line in questions_file().read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            keep = line[1:].strip() in sections
            continue
        parts = line.split()
        if keep and len(parts) == 4:
            out.append(tuple(parts))  # type: ignore[arg-type]
    return out


def row(q: tuple[str, str, str, str]) -> dict[str, Any]:
    a, b, c, d = q
    return {"messages": [{"role": "user", "content": QUESTION.format(a=a, b=b, c=c)},
                         {"role": "assistant", "content": d}]}


def build(out_dir: str | Path, *, n_train: int = 640, n_test: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Disjoint train / held-out splits (a seeded sample of each section in turn)."""
    rng = random.Random(seed)
    qs = load_questions()
    rng.shuffle(qs)
    by_section: dict[str, list[Any]] = {}
    for q in qs:  # interleave sections so both splits cover every relation
        by_section.setdefault(_section_of(q), []).append(q)
    mixed = [q for group in zip(*by_section.values()) for q in group]
    test, train = mixed[:n_test], mixed[n_test:n_test + n_train]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "analogy-train.jsonl", out / "analogy-test.jsonl"
    for path, rows in zip(paths, (train, test)):
        path.write_text("".join(json.dumps(row(q)) + "\n" for q in rows), encoding="utf-8")
    return paths


_SECTION_INDEX: dict[tuple[str, ...], str] = {}


def _section_of(q: tuple[str, ...]) -> str:
    if not _SECTION_INDEX:
        current = ""
        for line in questions_file().read_text(encoding="utf-8").splitlines():
            if line.startswith(":"):
                current = line[1:].strip()
            elif current in SECTIONS:
                _SECTION_INDEX[tuple(line.split())] = current
    return _SECTION_INDEX[tuple(q)]


def first_word(text: str) -> str:
    m = re.search(r"[A-Za-z][A-Za-z'\-]*", text)
    return m.group(0).lower() if m else ""


def accuracy(base: str | Path, rows: list[dict[str, Any]], adapter: str | Path | None = None, *,
             batch_size: int = 25, max_new_tokens: int = 6) -> dict[str, float]:
    """Greedy decoding; ``{"first_word": share of replies whose first word is the answer (the fixed format),
    "contains": share whose first ``max_new_tokens`` tokens contain the answer as a word anywhere}``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(adapter or base))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    hits = loose = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        prompts = [tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True) for r in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        replies = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for rep, r in zip(replies, chunk):
            answer = r["messages"][-1]["content"].lower()
            hits += first_word(rep) == answer
            loose += answer in re.findall(r"[a-z][a-z'\-]*", rep.lower())
    return {"first_word": hits / len(rows), "contains": loose / len(rows)}


def main(argv: list[str]) -> None:
    here = Path(__file__).resolve().parent / "data"
    train, test = here / "analogy-train.jsonl", here / "analogy-test.jsonl"
    if not (train.exists() and test.exists()):
        train, test = build(here)
    rows = [json.loads(x) for x in test.read_text().splitlines()]
    acc = accuracy(argv[0], rows, argv[1] if len(argv) > 1 else None)
    print(f"held-out accuracy ({len(rows)} questions): first word {acc['first_word']:.3f}, "
          f"answer anywhere in the reply {acc['contains']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
