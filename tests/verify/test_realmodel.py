"""``adaptkit verify`` on SmolLM2-135M-Instruct (slow): sound, passes the default gates against itself."""
from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.realmodel]


def test_verify_smollm2_against_itself(smollm2, adaptkit_cli, tmp_path):
    res = adaptkit_cli("verify", smollm2, "--baseline", smollm2, "--limit", "8", "--json", "--no-progress",
                       "--out", tmp_path / "rep")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["verdict"] == "pass" and doc["load"]["route"] == "transformers"
    gates = {g["gate"]: g for g in doc["gates"]}
    assert gates["bits_per_byte.max_increase"]["passed"] and gates["bits_per_byte.max_increase"]["delta"] == 0
    assert gates["agreement.min_top1"]["value"] == 1.0
    assert gates["probes.no_new_failures"]["passed"]
    assert (tmp_path / "rep" / "verify.png").read_bytes()[:4] == b"\x89PNG"
