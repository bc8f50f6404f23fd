"""The CLI as a process: SIGTERM and SIGKILL leave nothing behind, a closed pipe is not an error,
``--traceback`` works after the subcommand, and ``python -m adaptkit`` is the same CLI."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _default_sigint() -> None:
    """In the child before exec: a shell's background job starts with SIGINT ignored, and Python then keeps
    it ignored (as nohup wants); the test needs the interactive default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _adaptkit(*args: object) -> list[str]:
    return [sys.executable, "-m", "adaptkit", *map(str, args)]


def _wait_for_tmp(folder: Path, proc: subprocess.Popen, timeout: float = 120.0) -> Path:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        tmp = [p for p in folder.iterdir() if ".adaptkit-tmp-" in p.name]
        if tmp:
            return tmp[0]
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"finished before it could be signalled: rc={proc.returncode} {err}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no temporary output folder appeared")


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> Path:
    from adaptkit.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("m") / "model", hidden_size=256, num_layers=6,
                           intermediate_size=1024, num_heads=4, num_kv_heads=2)


def _gptq_args(model: Path, out: Path) -> list[str]:
    return _adaptkit("quantize", model, out, "--method", "gptq", "--group-size", "32", "--calib", "builtin-pydoc",
                     "--nsamples", "16", "--seqlen", "128")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_quantize_leaves_nothing(slow_model, tmp_path, sig, code) -> None:
    out = tmp_path / "q"
    proc = subprocess.Popen(_gptq_args(slow_model, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_default_sigint)
    _wait_for_tmp(tmp_path, proc)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_merge_leaves_nothing(slow_model, tmp_path) -> None:
    cfg = tmp_path.parent / f"{tmp_path.name}-cfg.yml"
    from adaptkit.testing import perturbed_copy

    other = perturbed_copy(slow_model, tmp_path.parent / f"{tmp_path.name}-other", seed=5)
    cfg.write_text(f"merge_method: slerp\nbase_model: {slow_model}\nmodels:\n  - model: {slow_model}\n"
                   f"  - model: {other}\nparameters: {{t: 0.3}}\n")
    out = tmp_path / "merged"
    for attempt in range(3):  # a merge is fast: retry if it finished before the signal arrived
        proc = subprocess.Popen(_adaptkit("merge", cfg, out, "--threads", "1", "--quiet"), env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for_tmp(tmp_path, proc, timeout=60)
        except pytest.fail.Exception:
            if out.exists():
                import shutil

                shutil.rmtree(out)
                continue
            raise
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == 0:
            import shutil

            shutil.rmtree(out)
            continue
        assert proc.returncode == 143, err
        assert list(tmp_path.iterdir()) == []
        return
    pytest.skip("the merge always finished before SIGTERM arrived")


def test_leftovers_of_a_killed_run_are_removed_by_the_next(slow_model, tmp_path) -> None:
    proc = subprocess.Popen(_gptq_args(slow_model, tmp_path / "q1"), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    left = _wait_for_tmp(tmp_path, proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    assert left.exists()
    r = subprocess.run(_adaptkit("quantize", slow_model, tmp_path / "q2", "--method", "rtn", "--group-size", "32"),
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q2"]


def test_closed_pipe_is_not_an_error(tmp_path) -> None:
    from adaptkit.testing import make_tiny_llama

    model = make_tiny_llama(tmp_path / "deep", hidden_size=16, num_heads=2, num_kv_heads=1, intermediate_size=32,
                            num_layers=200)
    cmd = " ".join(_adaptkit("inspect", model, "--tensors")) + " | head -n 2"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], env=ENV, capture_output=True, text=True)
    assert len(r.stdout.splitlines()) == 2
    assert r.stderr == "" and r.returncode == 0


def test_traceback_after_the_subcommand_and_python_m(tmp_path) -> None:
    r = subprocess.run(_adaptkit("inspect", tmp_path / "missing", "--traceback"), env=ENV, capture_output=True,
                       text=True)
    assert r.returncode != 0 and "Traceback (most recent call last)" in r.stderr and "CheckpointError" in r.stderr
    r = subprocess.run(_adaptkit("inspect", tmp_path / "missing"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 4 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = subprocess.run(_adaptkit("--version"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("adaptkit ")
