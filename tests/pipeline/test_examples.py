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


def test_training_files_mix_one_replay_row_per_three_task_rows(tasks, tmp_path):
    built = tasks.build(tmp_path)
    read = lambda p: [json.loads(x) for x in p.read_text().splitlines()]  # noqa: E731
    replay = read(EXAMPLES / "data" / "replay.jsonl")
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    replay_keys = {key(r) for r in replay}
    for mixed, task in ((built["analogy-replay"], ROOT / "examples/train/data/analogy-train.jsonl"),
                        (built["wordforms-replay"], tmp_path / "wordforms-train.jsonl")):
        rows, task_rows = read(mixed), read(task)
        n_replay = sum(key(r) in replay_keys for r in rows)
        assert n_replay == round(len(task_rows) / 3) and len(rows) == len(task_rows) + n_replay
        assert sorted(key(r) for r in rows if key(r) not in replay_keys) == sorted(key(r) for r in task_rows)
        assert [key(r) for r in rows[:20]] != [key(r) for r in task_rows[:20]]  # interleaved, not appended


def test_replay_questions_are_none_of_the_probes():
    """Replay rows keep the base's behaviour outside the tasks; none may be a question the release is scored on."""
    replay = [json.loads(x) for x in (EXAMPLES / "data" / "replay.jsonl").read_text().splitlines()]
    assert len(replay) >= 80
    asked = {r["messages"][0]["content"].strip().lower() for r in replay}
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"] for r in replay)
    probe_files = [ROOT / "plugins/adaptkit-eval/adaptkit_eval/probes/basic.jsonl",
                   EXAMPLES / "data" / "analogy.jsonl", EXAMPLES / "data" / "wordforms.jsonl"]
    for f in probe_files:
        for line in f.read_text().splitlines():
            p = json.loads(line)
            prompt = p.get("prompt") or p["messages"][-1]["content"]
            assert prompt.strip().lower() not in asked, (f.name, prompt)
    # no question is about a basic probe's subject (a FLORES sentence quoted after the question may mention one)
    words = ("france", "japan", "italy", "2 + 2", "week", "apple")
    assert not [q for q in asked for w in words if w in q.split("? ")[0]]


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
