"""The example release pipeline (examples/pipeline/) validates as shipped, and its task files are exactly the
deterministic build of ``examples/pipeline/tasks.py`` from the word-analogy file in gensim's wheel."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "pipeline"


@pytest.fixture
def tasks():
    if importlib.util.find_spec("gensim") is None:
        pytest.skip("the example tasks read gensim's test data: pip install gensim")
    sys.path.insert(0, str(EXAMPLES))
    try:
        import tasks as mod
    finally:
        sys.path.remove(str(EXAMPLES))
    return mod


def test_shipped_task_files_are_the_deterministic_build(tasks, tmp_path):
    built = tasks.build(tmp_path)
    for path in built.values():
        assert path.read_text() == (EXAMPLES / "data" / path.name).read_text(), path.name
    train = [json.loads(x) for x in (tmp_path / "wordforms-train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (tmp_path / "wordforms-test.jsonl").read_text().splitlines()]
    q = lambda rows: {r["messages"][0]["content"] for r in rows}  # noqa: E731
    assert not q(train) & q(test) and len(test) >= 30  # held out
    analogy_train = [json.loads(x) for x in (ROOT / "examples/train/data/analogy-train.jsonl").read_text().splitlines()]
    probes = [json.loads(x) for x in (tmp_path / "analogy.jsonl").read_text().splitlines()]
    assert not {p["messages"][0]["content"] for p in probes} & q(analogy_train)


def test_probe_rule_is_the_first_word_rule(tasks):
    import re

    p = tasks.probe("t", 0, tasks.wordform_row("gram4-superlative", "bright", "brightest"))
    for reply, ok in (("Brightest", True), (" brightest.", True), ("**brightest**", True), ("brightestly", False),
                      ("The brightest", False), ("bright", False)):
        assert (re.search(p["regex"], reply) is not None) is ok, reply


def test_release_pipeline_validates(adaptkit_cli, tiny_llama, monkeypatch, tmp_path):
    """Dry run with a tiny model standing in for SmolLM2 (nothing is opened): every step prepares."""
    pytest.importorskip("trl")
    pytest.importorskip("adaptkit_eval")
    monkeypatch.setenv("ADAPTKIT_BASE", str(tiny_llama()))
    monkeypatch.setenv("ADAPTKIT_RUN_OUT", str(tmp_path / "out"))
    r = adaptkit_cli("run", EXAMPLES / "smollm2-release.yml", "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    kinds = [s["kind"] for s in doc["steps"]]
    assert kinds[:6] == ["train", "train", "merge-adapter", "merge-adapter", "merge", "quantize"]
    assert kinds[-1] == "verify" and set(kinds) == {"train", "merge-adapter", "merge", "quantize", "eval", "verify"}
    assert all(s["status"] == "planned" for s in doc["steps"]) and not (tmp_path / "out").exists()
