"""Regenerate the small example datasets in data/ (deterministic; python examples/train/make_data.py).

The task is two-digit addition answered with the number alone, so a few steps of training visibly move the
loss and the rewards (exact_match on GRPO) have a checkable answer.
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent / "data"


def write(name, rows):
    HERE.mkdir(exist_ok=True)
    with (HERE / name).open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def main():
    rng = random.Random(0)
    pairs = [(rng.randint(10, 49), rng.randint(10, 49)) for _ in range(48)]
    q = lambda a, b: f"What is {a} + {b}? Answer with the number only."
    write("chat.jsonl", [{"messages": [{"role": "user", "content": q(a, b)},
                                       {"role": "assistant", "content": str(a + b)}]} for a, b in pairs])
    write("prompt_completion.jsonl", [{"prompt": q(a, b) + "\n", "completion": str(a + b)} for a, b in pairs])
    write("preference.jsonl", [{"prompt": q(a, b), "chosen": str(a + b), "rejected": str(a + b + rng.choice([-10, -1, 1, 10]))}
                               for a, b in pairs])
    write("kto.jsonl", [{"prompt": q(a, b), "completion": str(a + b) if i % 2 == 0 else str(a + b + 1),
                         "label": i % 2 == 0} for i, (a, b) in enumerate(pairs)])
    write("prompts.jsonl", [{"prompt": [{"role": "user", "content": q(a, b)}], "answer": str(a + b)} for a, b in pairs])


if __name__ == "__main__":
    main()
