"""The two real tasks of the release pipeline (``smollm2-release.yml``), built from data already installed.

* **analogy** -- word analogies answered with one word (``examples/train/analogy.py``: the word-analogy set in
  gensim's wheel, relations capital/country, family, comparative, nationality, past tense, plural);
* **wordforms** -- a different skill from other sections of the same file: an instruction names a word and
  the form wanted (adverb of an adjective, negated adjective, superlative, ``-ing`` form, third-person verb)
  and the answer is that one word, e.g. ``Write the superlative of the adjective 'bright'.`` -> ``brightest``.

``python examples/pipeline/tasks.py`` (re)writes ``data/``: the word-form train/held-out splits as chat rows
for the recipe, and one probe file per task (``adaptkit eval --tasks probes:FILE``): a held-out question whose
reply must *start* with the answer word (case-insensitive), the same rule as ``analogy.py``'s first-word score.
The splits are deterministic (seeded); ``tests/pipeline/test_examples.py`` checks the shipped files are
exactly this build. gensim itself is never imported.

Each task's training file for the pipeline (``analogy-replay.jsonl``, ``wordforms-replay.jsonl``) is its rows
plus replay rows -- general questions answered by the base model itself (``data/replay.jsonl``, written by
``replay.py``) -- one for every three task rows, interleaved by a seeded shuffle: without them the two narrow
fine-tunes teach the model to answer every question with one word (see ``replay.py``).
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path
from typing import Any

from adaptkit.train.data import read_rows  # the reader adaptkit train uses for these files

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "train"))
import analogy  # noqa: E402  (examples/train/analogy.py: the questions file, the analogy rows)

sys.path.pop(0)

FORMS = {
    "gram1-adjective-to-adverb": "Write the adverb formed from the adjective '{w}'. Answer with one word.",
    "gram2-opposite": "Write the opposite of the adjective '{w}', formed with a negative prefix. Answer with one word.",
    "gram4-superlative": "Write the superlative of the adjective '{w}'. Answer with one word.",
    "gram5-present-participle": "Write the -ing form of the verb '{w}'. Answer with one word.",
    "gram9-plural-verbs": "Write the form of the verb '{w}' used after 'he' or 'she' in the present tense. "
                          "Answer with one word.",
}
N_ANALOGY_PROBES = 60  #: the first held-out analogy questions (examples/train/data/analogy-test.jsonl)


def word_pairs() -> dict[str, list[tuple[str, str]]]:
    """``{section: sorted unique (word, form) pairs}`` of the word-form sections."""
    pairs: dict[str, set[tuple[str, str]]] = {s: set() for s in FORMS}
    section = ""
    for line in analogy.questions_file().read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
            continue
        parts = line.split()
        if section in pairs and len(parts) == 4:
            pairs[section].update({(parts[0], parts[1]), (parts[2], parts[3])})
    return {s: sorted(p) for s, p in pairs.items()}


def wordform_row(section: str, word: str, form: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": FORMS[section].format(w=word)},
                         {"role": "assistant", "content": form}]}


def build_wordforms(held_out: float = 0.25, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows): per section a seeded ``held_out`` share of the words is held out."""
    rng = random.Random(seed)
    train, test = [], []
    for section, pairs in word_pairs().items():
        pairs = list(pairs)
        rng.shuffle(pairs)
        k = round(len(pairs) * held_out)
        test += [wordform_row(section, w, f) for w, f in pairs[:k]]
        train += [wordform_row(section, w, f) for w, f in pairs[k:]]
    rng.shuffle(train)
    return train, test


def probe(task: str, i: int, row: dict[str, Any]) -> dict[str, Any]:
    """A probe passing when the reply starts with the answer word (the first-word rule of analogy.py)."""
    answer = row["messages"][-1]["content"]
    return {"id": f"{task}-{i:03d}", "messages": row["messages"][:-1],
            "regex": f"(?i)^[^A-Za-z]*{re.escape(answer)}(?![A-Za-z'-])", "max_new_tokens": 6}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


REPLAY_SHARE = 1 / 3  #: replay rows per task row in the pipeline's training files


def with_replay(rows: list[dict[str, Any]], replay: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """``rows`` plus ``round(len(rows) * REPLAY_SHARE)`` replay rows (cycling through a seeded shuffle of
    ``replay``), shuffled together with the same seed."""
    rng = random.Random(seed)
    pool = list(replay)
    rng.shuffle(pool)
    n = round(len(rows) * REPLAY_SHARE) if pool else 0
    mixed = list(rows) + [pool[i % len(pool)] for i in range(n)]
    rng.shuffle(mixed)
    return mixed


def build(out_dir: str | Path = HERE / "data") -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = build_wordforms()
    analogy_train = read_rows(HERE.parent / "train" / "data" / "analogy-train.jsonl")
    analogy_test = read_rows(HERE.parent / "train" / "data" / "analogy-test.jsonl")[:N_ANALOGY_PROBES]
    replay = read_rows(HERE / "data" / "replay.jsonl")
    return {
        "analogy-replay": write_jsonl(out / "analogy-replay.jsonl", with_replay(analogy_train, replay, seed=1)),
        "wordforms-replay": write_jsonl(out / "wordforms-replay.jsonl", with_replay(train, replay, seed=2)),
        "wordforms-train": write_jsonl(out / "wordforms-train.jsonl", train),
        "wordforms-test": write_jsonl(out / "wordforms-test.jsonl", test),
        "wordforms-probes": write_jsonl(out / "wordforms.jsonl", [probe("wordforms", i, r) for i, r in enumerate(test)]),
        "analogy-probes": write_jsonl(out / "analogy.jsonl", [probe("analogy", i, r) for i, r in enumerate(analogy_test)]),
    }


if __name__ == "__main__":
    for name, path in build(sys.argv[1] if len(sys.argv) > 1 else HERE / "data").items():
        print(f"{name}: {path} ({len(path.read_text().splitlines())} rows)")
