"""Do two checkpoints share a tokenizer? Token-level comparisons (top-1 agreement, KL) need the same token
ids for the same text; byte-level ones (bits per byte, accuracy) do not."""
from __future__ import annotations

from pathlib import Path
from typing import Any

#: text whose encoding must agree: prose, code, digits, whitespace runs, non-Latin scripts, emoji
PROBE_TEXT = ("The quick brown fox jumps over the lazy dog. def f(x):\n    return x ** 2  # 12345 67.89\n"
              "Voilà — naïve café; Привет мир; 你好，世界; こんにちは; 🙂  \t tabs and  spaces")


def compare_tokenizers(a: str | Path, b: str | Path, *, host: Any) -> tuple[bool, str]:
    """(same, reason): the same vocabulary (token -> id), special tokens and encoding of a probe text."""
    from adaptkit.verify.load import load_tokenizer

    ta = load_tokenizer(a, host=host)
    tb = load_tokenizer(b, host=host)
    va, vb = ta.get_vocab(), tb.get_vocab()
    if va != vb:
        only_a = len(set(va) - set(vb))
        only_b = len(set(vb) - set(va))
        moved = sum(1 for k in set(va) & set(vb) if va[k] != vb[k])
        return False, (f"vocabularies differ ({len(va)} vs {len(vb)} tokens; {only_a} only in {Path(a).name}, "
                       f"{only_b} only in {Path(b).name}, {moved} with other ids)")
    for attr in ("bos_token_id", "eos_token_id"):
        if getattr(ta, attr, None) != getattr(tb, attr, None):
            return False, f"{attr} differs ({getattr(ta, attr, None)} vs {getattr(tb, attr, None)})"
    ea = ta(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    eb = tb(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if list(ea) != list(eb):
        return False, "the same vocabulary encodes the same text differently (normalizer or pre-tokenizer differs)"
    return True, "same vocabulary, special tokens and encoding"
