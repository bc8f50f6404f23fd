"""Token counting and the label guard on hand-built batches of each TRL layout (counts computed by hand)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
engine = pytest.importorskip("adaptkit_trl.engine")


def test_padded_batches_count_the_attention_mask() -> None:
    am = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert engine.batch_tokens({"input_ids": torch.zeros(2, 4), "attention_mask": am}) == 5
    kto = {"attention_mask": am, "KL_attention_mask": torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])}
    assert engine.batch_tokens(kto) == 5 + 5
    orpo = {"chosen_attention_mask": am, "rejected_attention_mask": am[:1], "prompt_attention_mask": am}
    assert engine.batch_tokens(orpo) == 5 + 3  # the prompt is inside chosen/rejected: not counted twice
    grpo = {"prompt_mask": am, "completion_mask": torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])}
    assert engine.batch_tokens(grpo) == 5 + 3


def test_padding_free_batches_stop_at_the_trailing_padding() -> None:
    # documents of 3 and 4 tokens back to back, then 3 pads (position 0 each)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 0, 0]])
    assert engine.batch_tokens({"input_ids": torch.zeros(1, 10, dtype=torch.long), "position_ids": pos}) == 7
    assert engine.batch_tokens({"input_ids": torch.zeros(1, 6, dtype=torch.long)}) == 6


def test_label_tokens_per_layout() -> None:
    assert engine.label_tokens({"labels": torch.tensor([[-100, 5, 6], [-100, -100, 7]])}) == 3
    assert engine.label_tokens({"completion_mask": torch.tensor([[0, 1, 1], [0, 0, 0]])}) == 2
    assert engine.label_tokens({"chosen_labels": torch.tensor([[-100, 1]]), "rejected_labels": torch.tensor([[2, 3]])}) == 3
    assert engine.label_tokens([{"prompt": "x"}]) is None  # GRPO: no token labels to count
