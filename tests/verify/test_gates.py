"""Gates files (schema errors are one-line ConfigErrors naming the file and key) and the verdicts of
``adaptkit verify`` against a baseline: exit 0 when every gate passes, 7 when one fails, 3 for bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptkit.errors import ConfigError
from adaptkit.verify.gates import DEFAULT_GATES, load_gates


def _gates(tmp_path: Path, text: str, name: str = "gates.yml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, needle", [
    ("version: 1\nbits_per_byte: {max_increase: 0.1\n", "not valid YAML (line"),
    ("- 1\n- 2\n", "a gates file is a mapping"),
    ("version: 2\nbits_per_byte: {max_increase: 0.1}\n", "version: must be 1"),
    ("version: 1\nbits_per_bytes: {max_increase: 0.1}\n", "did you mean 'bits_per_byte'"),
    ("version: 1\nbits_per_byte: {max_increse: 0.1}\n", "unknown key bits_per_byte.'max_increse'"),
    ("version: 1\nbits_per_byte: {tasks: [flores_eng]}\n", "bits_per_byte: needs max_increase"),
    ("version: 1\nbits_per_byte: {max_increase: lots}\n", "bits_per_byte.max_increase: must be a finite number"),
    ("version: 1\nagreement: {min_top1: 1.5}\n", "agreement.min_top1: must be in [0, 1]"),
    ("version: 1\nagreement: {tasks: []}\n", "agreement.tasks: must be a non-empty list"),
    ("version: 1\nmultiple_choice: {metric: f1, min_accuracy_change: 0}\n", "must be acc or acc_norm"),
    ("version: 1\nprobes: {file: p.jsonl}\n", "probes: needs must_pass and/or no_new_failures"),
    ("version: 1\nlimit: 0\nprobes: {must_pass: all}\n", "limit: must be a positive integer"),
    ("version: 1\n", "no gates"),
])
def test_malformed_gates_files(tmp_path, text, needle):
    p = _gates(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_gates(p)
    msg = err.value.one_line()
    assert needle in msg and str(p) in msg and "\n" not in msg


def test_shipped_default_gates_are_valid():
    g = load_gates(DEFAULT_GATES)
    assert g.bits_per_byte["tasks"] == ["flores_eng"] and g.needs_baseline


def _run(adaptkit_cli, tmp_path, model, *args):
    res = adaptkit_cli("verify", model, "--json", "--no-progress", "--out", tmp_path / "rep", *args)
    return res, (json.loads(res.stdout) if res.stdout.strip() else None)


def test_bad_input_is_exit_3_before_any_work(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    cases = [
        (_gates(tmp_path, "version: 1\nbits_per_byte: {max_increase: 0.1}\n", "a.yml"), (), "give one (--baseline)"),
        (_gates(tmp_path, "version: 1\nbits_per_byte: {tasks: [flores], max_increase: 0.1}\n", "b.yml"),
         ("--baseline", m), "did you mean 'flores_eng'"),
        (_gates(tmp_path, "version: 1\nprobes: {must_pass: [capital_paris]}\n", "c.yml"), (), "no probe 'capital_paris'"),
        (_gates(tmp_path, "version: 1\nbits_per_byte: {max_increase: 0.1\n", "d.yml"), ("--baseline", m), "not valid YAML"),
    ]
    for gates, extra, needle in cases:
        res, _ = _run(adaptkit_cli, tmp_path, m, "--gates", gates, *extra)
        assert res.exit_code == 3, (gates, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and gates.name in lines[0], lines


def test_gate_failure_exit_7_and_pass_exit_0(tiny_llama, adaptkit_cli, tmp_path):
    base = tiny_llama()
    far = tiny_llama.perturbed(base, scale=0.5, seed=3)
    strict = _gates(tmp_path, "version: 1\nlimit: 6\nagreement: {min_top1: 0.999}\n"
                              "bits_per_byte: {max_increase: 5.0}\n", "strict.yml")
    res, doc = _run(adaptkit_cli, tmp_path, far, "--baseline", base, "--gates", strict)
    assert res.exit_code == 7, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "gate agreement.min_top1 failed on flores_eng" in lines[0]
    assert doc["verdict"] == "gate-failed"
    by_gate = {g["gate"]: g for g in doc["gates"]}
    assert not by_gate["agreement.min_top1"]["passed"] and by_gate["bits_per_byte.max_increase"]["passed"]
    # the report folder: JSON, model-card section with both tables, PNG chart
    out = tmp_path / "rep"
    assert json.loads((out / "verify.json").read_text())["verdict"] == "gate-failed"
    card = (out / "verify.md").read_text()
    assert "### Gates" in card and "| bits_per_byte | flores_eng |" in card and "**FAIL**" in card
    png = (out / "verify.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000

    lenient = _gates(tmp_path, "version: 1\nlimit: 6\nagreement: {min_top1: 0.0, max_kl: 100}\n"
                               "bits_per_byte: {max_increase: 100.0}\n", "lenient.yml")
    res, doc = _run(adaptkit_cli, tmp_path, far, "--baseline", base, "--gates", lenient)
    assert res.exit_code == 0, res.stderr
    assert doc["verdict"] == "pass" and len(doc["gates"]) == 3 and all(g["passed"] for g in doc["gates"])


def _other_tokenizer(model: Path) -> Path:
    """The same model with two token ids swapped in tokenizer.json: another tokenizer."""
    tj = json.loads((model / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(k for k, v in vocab.items() if 100 <= v < 102)
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (model / "tokenizer.json").write_text(json.dumps(tj))
    return model


def test_baseline_with_another_tokenizer(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    base = _other_tokenizer(tiny_llama())
    token_level = _gates(tmp_path, "version: 1\nlimit: 3\nagreement: {min_top1: 0.5}\n", "tok.yml")
    res, _ = _run(adaptkit_cli, tmp_path, m, "--baseline", base, "--gates", token_level)
    assert res.exit_code == 3, res.stderr
    line = res.stderr.strip()
    assert "different tokenizer" in line and "token-level gates need the same tokenizer" in line
    byte_level = _gates(tmp_path, "version: 1\nlimit: 3\nbits_per_byte: {max_increase: 100}\n", "byte.yml")
    res, doc = _run(adaptkit_cli, tmp_path, m, "--baseline", base, "--gates", byte_level)
    assert res.exit_code == 0, res.stderr
    assert doc["tokenizer"]["same"] is False and doc["gates"][0]["passed"]


def test_must_pass_probes(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"id": "anything", "prompt": "Hello", "regex": "(?s).*", "max_new_tokens": 2}\n'
                      '{"id": "never", "prompt": "Hello", "exact": "\\u0000impossible", "max_new_tokens": 2}\n')
    ok = _gates(tmp_path, "version: 1\nprobes: {file: probes.jsonl, must_pass: [anything]}\n", "ok.yml")
    res, doc = _run(adaptkit_cli, tmp_path, m, "--gates", ok)
    assert res.exit_code == 0, res.stderr
    assert [g["metric"] for g in doc["gates"]] == ["anything"]
    bad = _gates(tmp_path, "version: 1\nprobes: {file: probes.jsonl, must_pass: all}\n", "bad.yml")
    res, doc = _run(adaptkit_cli, tmp_path, m, "--gates", bad)
    assert res.exit_code == 7 and "probes.must_pass failed" in res.stderr and "never" in res.stderr
