"""Recipe datasets -> ``datasets.Dataset`` in the shape each TRL trainer expects.

The rows were already checked by the runner (:func:`adaptkit.train.data.check_dataset`); here they are read
again, normalised (a column that is a chat in some rows and a string in others becomes a chat everywhere) and
split. For SFT on ``messages`` with assistant-only loss the conversation is tokenized here, with the assistant
spans taken from the chat template itself (rendering the conversation up to each assistant turn), so the loss
mask does not depend on ``{% generation %}`` markers the template may lack.
"""
from __future__ import annotations

from typing import Any

from adaptkit.errors import ConfigError
from adaptkit.train.data import read_rows

#: columns each (method, row format) pair keeps; "*" keeps every column (GRPO passes them to the rewards)
KEEP = {
    "text": ("text",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
    "prompt": ("*",),
}
_ROLE_OF = {"prompt": "user", "completion": "assistant", "chosen": "assistant", "rejected": "assistant"}


def _as_chat(value: Any, column: str) -> list[dict[str, str]]:
    if isinstance(value, list):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return [{"role": _ROLE_OF.get(column, "user"), "content": value}]


def normalise(rows: list[dict[str, Any]], fmt: str) -> list[dict[str, Any]]:
    """Keep the columns the format needs; a column that is a chat in any row is a chat in every row."""
    keep = KEEP[fmt]
    if keep != ("*",):
        rows = [{k: r[k] for k in keep} for r in rows]
    else:
        rows = [dict(r) for r in rows]
    chat_cols = {k for r in rows for k, v in r.items() if k in _ROLE_OF and isinstance(v, list)}
    if fmt == "messages":
        return [{"messages": _as_chat(r["messages"], "messages")} for r in rows]
    if chat_cols:
        # a conversational prompt needs conversational completions (and vice versa) for TRL
        chat_cols = {k for k in _ROLE_OF if rows and k in rows[0]}
        rows = [{k: (_as_chat(v, k) if k in chat_cols else v) for k, v in r.items()} for r in rows]
    return rows


def load_split(request: Any) -> tuple[Any, Any]:
    """``(train, eval or None)`` datasets for the request (eval from ``eval_data`` or ``eval_split``)."""
    from datasets import Dataset

    spec = request.train_data
    train_rows = normalise(read_rows(spec.path, spec.max_rows), spec.format)
    eval_rows = None
    if request.eval_data is not None:
        e = request.eval_data
        eval_rows = normalise(read_rows(e.path, e.max_rows), e.format)
    train = _dataset(train_rows, spec.path)
    evals = _dataset(eval_rows, request.eval_data.path) if eval_rows is not None else None
    if request.eval_split is not None:
        parts = train.train_test_split(test_size=request.eval_split, seed=request.settings.seed, shuffle=True)
        train, evals = parts["train"], parts["test"]
    return train, evals


def _dataset(rows: list[dict[str, Any]], path: Any) -> Any:
    from datasets import Dataset

    try:
        return Dataset.from_list(rows)
    except Exception as exc:  # noqa: BLE001 - arrow type clashes between rows (e.g. answer int in one, str in another)
        raise ConfigError(f"{path}: rows do not share one column type per field ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:200]})") from None


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and "generation" in template and "endgeneration" in template  # type: ignore[operator]


def assistant_spans(tok: Any, messages: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns (each turn's content plus
    its end-of-turn text, as the template writes them)."""
    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True) if i else ""
        through = render(messages[: i + 1], False)
        if not (full.startswith(through) and through.startswith(before)):
            raise ConfigError(
                f"{where}: the chat template is not prefix-preserving (rendering the conversation up to "
                f"assistant turn {i} is not a prefix of the whole), so assistant-only loss cannot find the "
                "assistant tokens; set options.assistant_only_loss: false or use a template with "
                "{% generation %} markers")
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_messages(tok: Any, rows: Any, where: str) -> Any:
    """``messages`` rows -> ``input_ids`` + ``assistant_masks`` (1 on assistant tokens)."""
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"{where}: assistant-only loss needs a fast tokenizer (character offsets); set "
                          "options.assistant_only_loss: false")

    def one(example: dict[str, Any]) -> dict[str, Any]:
        text, spans = assistant_spans(tok, example["messages"], where)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [1 if any(s < b and e > a for a, b in spans) else 0 for s, e in enc["offset_mapping"]]
        return {"input_ids": enc["input_ids"], "assistant_masks": mask}

    return rows.map(one, remove_columns=rows.column_names)
