"""Scale-out: ``adaptkit train --nproc 2`` (torch.distributed.run, gloo on CPU) with batch B per process
follows the same loss curve as one process with batch 2B."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import chat_rows, read_log, write_jsonl, write_recipe

pytest.importorskip("trl")
pytest.importorskip("torch")


@pytest.mark.slow
def test_two_gloo_processes_match_one_with_the_doubled_batch(tiny_llama, tmp_path) -> None:
    base = tiny_llama()
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(32))
    recipe = write_recipe(tmp_path / "r.yml", base=str(base), method="sft", data={"train": str(data)},
                          adapter={"kind": "lora", "r": 4},
                          training={"max_steps": 4, "batch_size": 4, "learning_rate": 5e-3, "max_seq_len": 64,
                                    "lr_scheduler": "constant"})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ADAPTKIT_PLUGINS", None)

    def train(out, *args):
        r = subprocess.run([sys.executable, "-m", "adaptkit", "train", str(recipe), "--output", str(out), "-q", *args],
                           capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    two = train(tmp_path / "two", "--nproc", "2", "--json")
    train(tmp_path / "one", "--set", "training.batch_size=8")
    assert json.loads(two.stdout)["steps"] == 4  # one JSON document: only rank 0 reports
    doc = json.loads((tmp_path / "two" / "adaptkit.json").read_text())
    assert doc["world_size"] == 2 and doc["request"]["settings"]["nproc"] == 2
    one = [e["loss"] for e in read_log(tmp_path / "one") if "loss" in e]
    dist = [e["loss"] for e in read_log(tmp_path / "two") if "loss" in e]
    assert len(one) == len(dist) == 4
    assert dist == pytest.approx(one, rel=1e-4)
    assert one[-1] < one[0]  # it did train
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".two", ".one"))]
