"""Calibration data for GPTQ and AWQ: ``nsamples`` token windows of ``seqlen`` tokens, drawn with the seed.

Sources (``QuantizeRequest.calib``):

* ``"builtin"`` -- real English text that every CPython installation ships: the help topics of
  ``pydoc_data.topics`` (~460 kB: the language reference, prose and code). Always available, no network.
* ``"builtin-wiki"`` -- the shortened English Wikipedia dump in gensim's test data (needs ``gensim``
  installed; an error says so otherwise).
* a path to a ``.jsonl`` file with one ``{"text": "..."}`` object per line (other keys are ignored).

The texts are tokenized one by one (no special tokens), joined with the tokenizer's EOS id (when it has
one) in file order, and ``nsamples`` windows are drawn from the concatenation with a ``torch.Generator``
seeded by ``seed``: when the text holds at least ``nsamples`` disjoint windows, distinct aligned windows are
chosen (after a seeded offset), so no token is used twice; otherwise windows start at seeded random
positions and may overlap. Fewer tokens than one window is an error.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptkit.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

BUILTIN = "builtin"
BUILTIN_WIKI = "builtin-wiki"


def builtin_texts() -> list[str]:
    """The help-topic texts of ``pydoc_data.topics`` in sorted key order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - stripped Python builds
        raise ConfigError(
            "--calib builtin: this Python has no pydoc_data.topics (a stripped build); pass --calib FILE.jsonl"
        ) from None
    return [topics[key] for key in sorted(topics)]


def wiki_texts() -> list[str]:
    """Article texts of the shortened English Wikipedia dump that gensim ships in its test data."""
    import bz2
    import re

    try:
        import gensim  # noqa: F401
        from gensim.test.utils import datapath
    except ImportError:
        raise ConfigError("--calib builtin-wiki needs gensim installed (pip install gensim); use --calib builtin") from None
    path = Path(datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"))
    if not path.is_file():
        raise ConfigError(f"--calib builtin-wiki: gensim's test data file {path} is missing")
    xml = bz2.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    texts = []
    for body in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S):
        body = re.sub(r"\{\{.*?\}\}|\[\[(?:[^\]|]*\|)?([^\]]*)\]\]|<[^>]+>|&[a-z]+;|'{2,}", r"\1", body, flags=re.S)
        if len(body.strip()) > 200:
            texts.append(body.strip())
    return texts


def read_jsonl(path: str | Path) -> list[str]:
    """The ``text`` fields of a JSONL file; one-line ConfigErrors for a missing/empty/malformed file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--calib {p}: calibration file does not exist")
    if not p.is_file():
        raise ConfigError(f"--calib {p}: calibration path is not a regular file")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--calib {p}: calibration file is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"--calib {p}: cannot read calibration file ({e.strerror})") from None
    texts: list[str] = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"--calib {p}:{lineno}: not valid JSON ({e.msg}); expected one {{\"text\": ...}} per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ConfigError(f"--calib {p}:{lineno}: each line must be a JSON object with a string \"text\" field")
        if obj["text"].strip():
            texts.append(obj["text"])
    if not texts:
        raise ConfigError(f"--calib {p}: calibration file has no non-empty \"text\" entries")
    return texts


def load_texts(calib: str | Path | None) -> tuple[str, list[str]]:
    """(label, texts) for a ``--calib`` value."""
    if calib is None or str(calib) == BUILTIN:
        return "builtin (pydoc_data.topics)", builtin_texts()
    if str(calib) == BUILTIN_WIKI:
        return "builtin-wiki (gensim enwiki test data)", wiki_texts()
    return str(calib), read_jsonl(calib)


def tokenize_texts(texts: list[str], tokenizer: Any) -> "torch.Tensor":
    """Concatenated token ids (int64, 1-D) of ``texts``, separated by the EOS id when the tokenizer has one."""
    import torch

    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if ids and eos is not None:
            ids.append(int(eos))
        ids.extend(int(t) for t in enc)
    return torch.tensor(ids, dtype=torch.int64)


def sample_windows(ids: "torch.Tensor", nsamples: int, seqlen: int, seed: int, *, label: str = "calibration") -> "torch.Tensor":
    """``[nsamples, seqlen]`` windows of ``ids`` drawn deterministically from ``seed`` (see module doc)."""
    import torch

    if nsamples < 1:
        raise ConfigError(f"--nsamples must be >= 1, got {nsamples}")
    if seqlen < 1:
        raise ConfigError(f"--seqlen must be >= 1, got {seqlen}")
    total = int(ids.numel())
    if total < seqlen:
        raise ConfigError(
            f"--calib {label}: calibration text is too short: {total} tokens, needs at least --seqlen {seqlen}"
        )
    gen = torch.Generator().manual_seed(int(seed))
    n_chunks = total // seqlen
    if n_chunks >= nsamples:
        offset = int(torch.randint(0, total - n_chunks * seqlen + 1, (1,), generator=gen))
        chunks = torch.randperm(n_chunks, generator=gen)[:nsamples]
        starts = offset + chunks * seqlen
    else:
        starts = torch.randint(0, total - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[int(s): int(s) + seqlen] for s in starts])


def calibration_ids(request: Any, tokenizer: Any) -> "torch.Tensor":
    """``[request.nsamples, request.seqlen]`` int64 token ids for ``request.calib`` (the driver's hook)."""
    label, texts = load_texts(request.calib)
    ids = tokenize_texts(texts, tokenizer)
    return sample_windows(ids, int(request.nsamples), int(request.seqlen), int(request.seed), label=label)


def load_tokenizer(model_dir: str | Path) -> Any:
    """The model folder's tokenizer (local files only); a one-line error when there is none."""
    from adaptkit.errors import CheckpointError

    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing tokenizer
        raise CheckpointError(
            f"{model_dir}: cannot load the tokenizer needed for calibration ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
