"""`adaptkit inspect` through the CLI: hostile files are one-line errors (exit 4), pickle needs a flag."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from adaptkit.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def raw_safetensors(path, header: dict, data: bytes):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def test_inspect_summarises_a_real_file(tmp_path):
    tensors = {"a.weight": torch.zeros(4, 3, dtype=torch.bfloat16), "b.bias": torch.ones(5)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    r = run("inspect", tmp_path, "--json", "--tensors")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["tensors"] == 2 and doc["parameters"] == 17
    assert doc["dtypes"] == {"BF16": 1, "F32": 1}
    assert doc["bytes"] == 4 * 3 * 2 + 5 * 4
    assert {t["name"]: t["shape"] for t in doc["tensor_list"]} == {"a.weight": [4, 3], "b.bias": [5]}


@pytest.mark.parametrize(
    "header,data,rule",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, b"\0" * 16, "gap"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "12"),
    ],
)
def test_hostile_files_are_one_line_errors(tmp_path, header, data, rule):
    f = raw_safetensors(tmp_path / "model.safetensors", header, data)
    r = run("inspect", f)
    assert r.exit_code == 4, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.safetensors" in lines[0]
    assert rule in lines[0].lower()


def test_truncated_and_oversized_headers(tmp_path):
    f = tmp_path / "t.safetensors"
    f.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    r = run("inspect", f)
    assert r.exit_code == 4 and "t.safetensors" in r.output and len(r.output.strip().splitlines()) == 1


def test_pickle_weights_refused_unless_flag(tmp_path):
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, tmp_path / "pytorch_model.bin")
    r = run("inspect", tmp_path)
    assert r.exit_code == 4 and "--allow-pickle" in r.output and "pytorch_model.bin" in r.output
    r = run("inspect", tmp_path, "--allow-pickle", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["parameters"] == 6


def test_pickle_with_code_is_refused_even_with_flag(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"w": Evil()}, fh)
    r = run("inspect", tmp_path, "--allow-pickle")
    assert r.exit_code == 4, r.output
    assert "pwned" not in r.output
