"""Refactors keep outputs byte-identical: every merge method and every quantizer, run through the CLI on
tiny models, must reproduce the sha256 of every output file recorded before the four-kinds redesign
(``tests/golden/produce.py --write``). A deliberate change of output needs a new recording and a note."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from tests.golden.produce import HASHES, produce  # noqa: E402


def test_outputs_byte_identical_to_recording(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expected = json.loads(HASHES.read_text())
    got = produce(tmp_path)
    assert sorted(got) == sorted(expected)
    diffs = [f"{case}/{name}" for case, files in expected.items() for name, h in files.items()
             if got[case].get(name) != h]
    missing = [f"{case}/{name}" for case, files in got.items() for name in files if name not in expected[case]]
    assert not diffs, f"outputs changed: {diffs}"
    assert not missing, f"new files that are not recorded: {missing}"
