"""Atomic publication of output folders, including SIGKILL at random moments."""
from __future__ import annotations

import json
import fcntl
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from adaptkit.errors import OutputError
from adaptkit.io import atomic_output_dir, check_output_target, clean_stale
from adaptkit.io.atomic import TMP_MARK


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if TMP_MARK in p.name or ".adaptkit-probe-" in p.name)


def test_publish_creates_target(tmp_path):
    target = tmp_path / "out"
    with atomic_output_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.adaptkit-tmp-")
        assert not target.exists()
        (tmp / "a.txt").write_text("hello")
    assert (target / "a.txt").read_text() == "hello"
    assert _leftovers(tmp_path) == []


def test_error_removes_temp_and_leaves_no_target(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyError):
        with atomic_output_dir(target) as tmp:
            (tmp / "a.txt").write_text("partial")
            raise KeyError("boom")
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_nonempty_target_without_force(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    msg = f"{target} exists and is not empty; pass --force to replace it"
    with pytest.raises(OutputError) as ei:
        check_output_target(target, force=False)
    assert str(ei.value) == msg
    with pytest.raises(OutputError, match="pass --force"):
        with atomic_output_dir(target):
            pytest.fail("must not be entered")
    assert (target / "keep.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_existing_file_target_needs_force(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    with pytest.raises(OutputError, match="exists and is not a folder; pass --force"):
        check_output_target(target, False)
    with atomic_output_dir(target, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (target / "new.txt").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_empty_dir_target_is_fine(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    check_output_target(target, False)
    with atomic_output_dir(target) as tmp:
        (tmp / "x").write_text("1")
    assert sorted(os.listdir(target)) == ["x"]


def test_force_replaces_existing(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    (target / "sub").mkdir()
    (target / "sub" / "deep.txt").write_text("deep")
    with atomic_output_dir(target, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").exists()  # the old one is intact until publication
    assert sorted(os.listdir(target)) == ["new.txt"]
    assert _leftovers(tmp_path) == []


def test_force_error_keeps_old_target(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError
    assert sorted(os.listdir(target)) == ["old.txt"]


def test_parent_created_when_missing(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with atomic_output_dir(target) as tmp:
        (tmp / "f").write_text("1")
    assert (target / "f").exists()


def test_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not a folder"):
        check_output_target(tmp_path / "file" / "out", False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_parent_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_output_target(ro / "out", False)
    finally:
        ro.chmod(0o755)


def test_parent_not_writable_even_for_root():
    # /proc refuses new entries for everyone, root included
    with pytest.raises(OutputError, match="cannot create /proc/adaptkit-out"):
        check_output_target("/proc/adaptkit-out", False)


def test_refuses_to_replace_cwd(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="contains the current directory"):
        check_output_target(tmp_path, True)


def test_stale_temp_dirs_cleaned_live_ones_kept(tmp_path):
    target = tmp_path / "out"
    stale = tmp_path / f".out{TMP_MARK}deadbeef"
    stale.mkdir()
    (stale / "junk").write_text("x")
    dead_other = tmp_path / f".other{TMP_MARK}cafe"  # another target's temp, left by a killed run
    dead_other.mkdir()
    live_other = tmp_path / f".third{TMP_MARK}f00d"  # another target's temp that a live run holds locked
    live_other.mkdir()
    fd = os.open(live_other, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with atomic_output_dir(target) as tmp:
            assert not stale.exists() and not dead_other.exists()
            # our own live temp folder, and another live run's, survive a concurrent cleaner
            assert clean_stale(target) == []
            assert tmp.exists() and live_other.exists()
    finally:
        os.close(fd)


CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from adaptkit.io import ShardedWriter, TensorSpec, atomic_output_dir
    target, force, tag = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
    specs = [TensorSpec(f"t{i}", "F32", (256,)) for i in range(8)]
    with atomic_output_dir(target, force=force) as tmp:
        print("start", flush=True)
        w = ShardedWriter(tmp, specs, max_shard_size=2048)
        for i in reversed(range(8)):
            w.write_bytes(f"t{i}", bytes([(i * 7 + tag) % 256]) * 1024)
            time.sleep(0.015)
        w.close()
        (tmp / "config.json").write_text(json.dumps({"tag": tag}))
        time.sleep(0.01)
    print("done", flush=True)
    """
)


def _check_complete(target: Path) -> int:
    """Assert ``target`` is a complete, valid checkpoint and return its tag."""
    tag = json.loads((target / "config.json").read_text())["tag"]
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert sorted(os.listdir(target)) == sorted({*index["weight_map"].values(), "config.json",
                                                 "model.safetensors.index.json"})
    seen = {}
    for shard in sorted(set(index["weight_map"].values())):
        seen.update(load_file(target / shard))  # the reference reader validates every shard
    assert sorted(seen) == [f"t{i}" for i in range(8)]
    for i in range(8):
        assert seen[f"t{i}"].numpy().tobytes() == bytes([(i * 7 + tag) % 256]) * 1024
    return tag


def test_sigkill_at_random_moments_leaves_no_target_or_a_complete_one(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    target = tmp_path / "out"
    rng = random.Random(1234)
    outcomes = []
    for it in range(8):
        force = it >= 4  # first fresh targets, then replacing an existing complete one
        if not force and target.exists():
            shutil.rmtree(target)
        if force and not target.exists():
            subprocess.run([sys.executable, str(script), str(target), "0", "99"], check=True, capture_output=True)
        before = _check_complete(target) if target.exists() else None
        proc = subprocess.Popen(
            [sys.executable, str(script), str(target), "1" if force else "0", str(it + 1)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        if it in (0, 4):
            time.sleep(0.01)  # very early: probably before anything exists
        else:
            line = proc.stdout.readline()
            assert line == "start\n", proc.stderr.read()
            time.sleep(rng.uniform(0.0, 0.2))  # the write takes ~0.15 s: kill before, during or after it
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        if target.exists():
            tag = _check_complete(target)
            assert tag in {before, it + 1}
            outcomes.append("old" if tag == before else "new")
        else:
            assert before is None  # a replacement never loses the previous output
            outcomes.append("absent")
    # a normal later run for the same target succeeds and sweeps the killed runs' temp folders
    subprocess.run([sys.executable, str(script), str(target), "1", "100"], check=True, capture_output=True)
    assert _check_complete(target) == 100
    assert _leftovers(tmp_path) == [], outcomes


def test_rename_exchange_swaps_atomically(tmp_path):
    from adaptkit.io.atomic import _renameat2_exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "from_a").write_text("a")
    b.write_text("b is a file")
    if not _renameat2_exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) unsupported here; the rename-aside fallback is used")
    assert (b / "from_a").read_text() == "a" and a.read_text() == "b is a file"
