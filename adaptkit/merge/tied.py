"""Tied input/output embeddings (``tie_word_embeddings``).

The output ties its embeddings exactly when the output's template model (the base, else the first model)
does. With a tied output, an input's stored ``lm_head.weight`` is left out (and recorded as excluded) when
that input ties too; an untied input with its own head is an error, and so is a tied input without a head
when the output has a separate one. Nothing is dropped silently.
"""
from __future__ import annotations

from typing import Any

from adaptkit.errors import CheckpointError

TIED_HEAD = "lm_head.weight"


def is_tied(config: dict[str, Any] | None, ckpt: Any) -> bool:
    """Whether a model ties its embeddings: ``tie_word_embeddings`` in its config (or its ``text_config``),
    else whether it stores no ``lm_head.weight``."""
    cfg = config or {}
    v = cfg.get("tie_word_embeddings")
    if v is None and isinstance(cfg.get("text_config"), dict):
        v = cfg["text_config"].get("tie_word_embeddings")
    if isinstance(v, bool):
        return v
    return TIED_HEAD not in ckpt


def drop_tied_head(names: list[str], label: str, tied: bool, out_tied: bool,
                   excluded: list[tuple[str, str, str]]) -> list[str]:
    """``names`` of one input without its ``lm_head.weight`` when the output and the input both tie (recorded
    in ``excluded``); an error when the output ties but the input has its own head."""
    if TIED_HEAD not in names or not out_tied:
        return names
    if tied:
        excluded.append((label, TIED_HEAD, "tied to the input embedding (tie_word_embeddings)"))
        return [n for n in names if n != TIED_HEAD]
    raise CheckpointError(
        f"model {label!r} has its own {TIED_HEAD!r} (tie_word_embeddings is false) but the output ties the "
        f"embeddings (from the base/first model); merge models with the same tying, or add '{TIED_HEAD}' to "
        "'exclude'"
    )


def check_untied_has_head(participants: list[tuple[str, Any, bool]], out_tied: bool) -> None:
    """With an untied output, a tied participant without a head cannot be merged with ones that have one
    (``participants``: label, checkpoint, whether it ties)."""
    if out_tied:
        return
    for label, ckpt, tied in participants:
        if TIED_HEAD not in ckpt and tied and any(TIED_HEAD in c for _, c, _ in participants):
            raise CheckpointError(
                f"model {label!r} ties its embeddings (no {TIED_HEAD!r}) but the output has a separate lm_head "
                "(from the base/first model); merge models with the same tying"
            )
