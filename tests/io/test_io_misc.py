"""parse_size, aux-file copying, manifests, and the no-torch-at-import rule."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from adaptkit.errors import CheckpointError, ConfigError
from adaptkit.io import AUX_FILES, copy_aux_files, parse_size, verify_manifest, write_manifest
from adaptkit.io.sizes import format_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5GB", 5 * 10**9),  # decimal, as Hugging Face's max_shard_size
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1.5G", int(1.5 * 2**30)),
        ("4096", 4096),
        (" 10 kb ", 10_000),
        ("3MiB", 3 * 2**20),
        ("1TB", 10**12),
        ("7B", 7),
        (123, 123),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GB", "5XB", "-1GB", "0", "1e9", "5 G B", True, 0])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError) as ei:
        parse_size(bad)
    assert repr(bad) in str(ei.value)


def test_format_size():
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(5 * 2**30) == "5.0 GiB"


def test_copy_aux_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "config.json", "model.safetensors", "README.md", "merges.txt"):
        (src / name).write_text(f"content of {name}")
    copied = copy_aux_files(src, dst)
    assert copied == ["tokenizer.json", "tokenizer_config.json", "merges.txt", "chat_template.jinja",
                      "generation_config.json", "config.json"]
    for name in copied:
        assert (dst / name).read_text() == f"content of {name}"
    assert not (dst / "model.safetensors").exists() and not (dst / "README.md").exists()
    assert set(copied) - {"config.json"} <= set(AUX_FILES)

    dst2 = tmp_path / "dst2"
    dst2.mkdir()
    assert "config.json" not in copy_aux_files(src / "model.safetensors", dst2, config=False)
    assert not (dst2 / "config.json").exists() and (dst2 / "tokenizer.json").exists()


def test_copy_aux_files_follows_inside_symlinks_refuses_escape(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "real.json").write_text("{}")
    os.symlink("real.json", src / "tokenizer.json")
    assert copy_aux_files(src, dst) == ["tokenizer.json"]
    assert not (dst / "tokenizer.json").is_symlink() and (dst / "tokenizer.json").read_text() == "{}"
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    os.symlink(secret, src / "vocab.json")
    with pytest.raises(CheckpointError, match="'vocab.json' resolves outside the checkpoint folder"):
        copy_aux_files(src, tmp_path / "dst")


def test_manifest_round_trip_and_tamper_detection(tmp_path):
    import hashlib

    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("hello")
    path = write_manifest(tmp_path)
    m = json.loads(path.read_text())
    assert m["files"]["a.bin"] == {"sha256": hashlib.sha256(b"abc").hexdigest(), "size": 3}
    assert set(m["files"]) == {"a.bin", "sub/b.txt"}
    verify_manifest(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"abd")
    with pytest.raises(CheckpointError, match="a.bin does not match its sha256"):
        verify_manifest(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "extra").write_text("x")
    with pytest.raises(CheckpointError, match="extra is not listed"):
        verify_manifest(tmp_path)
    os.remove(tmp_path / "extra")
    os.remove(tmp_path / "sub" / "b.txt")
    with pytest.raises(CheckpointError, match="sub/b.txt is listed .* but missing"):
        verify_manifest(tmp_path)


def test_import_does_not_load_torch():
    code = "import sys, adaptkit.io; print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
