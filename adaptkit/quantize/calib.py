"""Calibration data for quantizers that declare ``needs_calibration`` (GPTQ, AWQ, third-party ones):
``nsamples`` token windows of ``seqlen`` tokens, drawn with the seed. Core, not a plugin, so that every
quantizer gets the same sources through ``QuantizeRequest.calibration_ids`` and the runner can validate
``--calib`` before anything is loaded.

Sources (``QuantizeRequest.calib``):

* ``"builtin"`` (default) -- real English prose, ~2.9 MB, from the test data inside gensim's wheel (a
  dependency of adaptkit-quant, optional for core; read as files, gensim is never imported): the 300 news articles of the Lee
  corpus (``lee_background.cor``) followed by the 96 longest articles of the shortened English Wikipedia
  dump (wikitext reduced to its prose paragraphs: templates, tables, references, file links and list
  lines removed). Disjoint from FLORES+, which the quality benchmark evaluates on.
* ``"builtin-news"`` / ``"builtin-wiki"`` -- either half alone.
* ``"builtin-pydoc"`` -- the help topics of CPython's ``pydoc_data.topics`` (~460 kB of language-reference
  prose and code; needs nothing but Python).
* a path to a ``.jsonl`` file with one ``{"text": "..."}`` object per line (other keys are ignored).

The texts are tokenized one by one (no special tokens), joined with the tokenizer's EOS id (when it has
one) in source order, and ``nsamples`` windows are drawn from the concatenation with a ``torch.Generator``
seeded by ``seed``: when the text holds at least ``nsamples`` disjoint windows, distinct aligned windows are
chosen (after a seeded offset), so no token is used twice; otherwise windows start at seeded random
positions and may overlap. Fewer tokens than one window is an error.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptkit.errors import ConfigError
from adaptkit.io.textdata import jsonl_texts

if TYPE_CHECKING:  # pragma: no cover
    import torch

BUILTIN = "builtin"
BUILTIN_NEWS = "builtin-news"
BUILTIN_WIKI = "builtin-wiki"
BUILTIN_PYDOC = "builtin-pydoc"
BUILTIN_SOURCES = (BUILTIN, BUILTIN_NEWS, BUILTIN_WIKI, BUILTIN_PYDOC)

LEE_FILE = "lee_background.cor"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def pydoc_texts() -> list[str]:
    """The help-topic texts of ``pydoc_data.topics`` in sorted key order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - stripped Python builds
        raise ConfigError(
            "--calib builtin-pydoc: this Python has no pydoc_data.topics (a stripped build); pass --calib FILE.jsonl"
        ) from None
    return [topics[key] for key in sorted(topics)]


def gensim_test_data(name: str, source: str) -> Path:
    """Path of a file in gensim's ``test/test_data`` folder, found without importing gensim."""
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"--calib {source} reads real text shipped in gensim's wheel, and gensim is not installed "
            "(pip install gensim; adaptkit-quant depends on it), or pass --calib FILE.jsonl"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / name
    if not path.is_file():
        raise ConfigError(f"--calib {source}: gensim's test data file {path} is missing (a stripped gensim install?)")
    return path


def news_texts(source: str = BUILTIN_NEWS) -> list[str]:
    """The 300 news articles of the Lee corpus (one per line) in gensim's test data."""
    text = gensim_test_data(LEE_FILE, source).read_text(encoding="utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def clean_wikitext(body: str) -> str:
    """The prose paragraphs of one article's wikitext (markup removed, non-prose lines dropped)."""
    import html
    import re

    t = html.unescape(body)
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<ref[^>]*/>", "", t)
    t = re.sub(r"<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    t = re.sub(r"<[^>]+>", "", t)
    prev = None
    while prev != t:  # innermost first: templates and tables nest
        prev = t
        t = re.sub(r"\{\{[^{}]*\}\}", "", t)
        t = re.sub(r"\{\|[^{}]*?\|\}", "", t, flags=re.S)
        t = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*\]\]", "", t)
    t = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]|]*)\]\]", r"\1", t)  # [[target|label]] -> label
    t = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", t)
    t = re.sub(r"'{2,}", "", t)
    keep = []
    for line in t.splitlines():
        s = line.strip()
        leftover = any(m in s for m in ("{{", "}}", "[[", "]]", "{|", "|}"))  # unbalanced or odd markup
        if len(s) >= 60 and s[0] not in "|!{}*#:;=[" and re.match(r"[A-Z0-9\"(]", s) and not leftover:
            keep.append(s)
    return "\n".join(keep)


def wiki_texts(source: str = BUILTIN_WIKI) -> list[str]:
    """Prose of the articles (over 500 characters after cleaning) of gensim's shortened enwiki dump."""
    import bz2
    import re

    path = gensim_test_data(WIKI_FILE, source)
    xml = bz2.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    texts = []
    for body in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S):
        prose = clean_wikitext(body)
        if len(prose) > 500:
            texts.append(prose)
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
    texts = [t for t in jsonl_texts(raw, f"--calib {p}") if t.strip()]
    if not texts:
        raise ConfigError(f"--calib {p}: calibration file has no non-empty \"text\" entries")
    return texts


def load_texts(calib: str | Path | None) -> tuple[str, list[str]]:
    """(label, texts) for a ``--calib`` value."""
    src = BUILTIN if calib is None else str(calib)
    if src == BUILTIN:
        return "builtin (gensim test data: Lee news corpus + English Wikipedia)", news_texts(BUILTIN) + wiki_texts(BUILTIN)
    if src == BUILTIN_NEWS:
        return "builtin-news (gensim test data: Lee news corpus)", news_texts()
    if src == BUILTIN_WIKI:
        return "builtin-wiki (gensim test data: English Wikipedia)", wiki_texts()
    if src == BUILTIN_PYDOC:
        return "builtin-pydoc (pydoc_data.topics)", pydoc_texts()
    return src, read_jsonl(src)


def tokenize_texts(texts: list[str], tokenizer: Any) -> "torch.Tensor":
    """Concatenated token ids (int64, 1-D) of ``texts``, separated by the EOS id when the tokenizer has one."""
    import torch

    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    if getattr(tokenizer, "is_fast", False) and texts:
        # one batch call: the same ids per text as one call each, without the per-call overhead
        encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    else:
        encoded = (tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] for text in texts)
    for enc in encoded:
        if ids and eos is not None:
            ids.append(int(eos))
        ids.extend(map(int, enc))
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
    """``[request.nsamples, request.seqlen]`` int64 token ids for ``request.calib`` (``QuantizeRequest.calibration_ids``)."""
    label, texts = load_texts(request.calib)
    ids = tokenize_texts(texts, tokenizer)
    spec = getattr(request, "spec", None)
    gs = int(getattr(spec, "group_size", -1) or -1)
    if gs > 0 and ids.numel() < gs:
        raise ConfigError(
            f"--calib {label}: calibration text is shorter than one group: {ids.numel()} tokens, --group-size {gs} "
            "needs at least that many"
        )
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


def validate_source(calib: str | None, nsamples: int, seqlen: int) -> None:
    """Cheap checks of the calibration source before any model is loaded (the algorithm tokenizes it)."""
    if nsamples < 1:
        raise ConfigError(f"--nsamples {nsamples} must be >= 1")
    if seqlen < 8:
        raise ConfigError(f"--seqlen {seqlen} must be >= 8")
    if calib in (None, "") or calib in BUILTIN_SOURCES:
        return  # built-in sources are checked when they are read
    p = Path(calib)
    if not p.is_file():
        raise ConfigError(
            f"{calib}: calibration file not found (give a .jsonl file with a 'text' field per line, or one of "
            f"{', '.join(BUILTIN_SOURCES)})"
        )
    texts = 0
    chars = 0
    with p.open("r", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{calib}:{lineno}: not valid JSON ({e.msg})") from None
            text = row.get("text") if isinstance(row, dict) else row if isinstance(row, str) else None
            if not isinstance(text, str):
                raise ConfigError(f"{calib}:{lineno}: each line must be a JSON object with a string 'text' field")
            texts += 1
            chars += len(text)
    if texts == 0:
        raise ConfigError(f"{calib}: calibration file is empty (no JSON lines with a 'text' field)")
    # a token is at least one character: fewer characters than one sequence can never fill a sample
    if chars < seqlen:
        raise ConfigError(
            f"{calib}: calibration text is too short ({chars} characters in {texts} lines; need at least "
            f"--seqlen {seqlen} tokens for one sample)"
        )
