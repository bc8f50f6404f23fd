"""A signal whose interrupt was raised where Python ignores exceptions (a weakref/GC callback) is raised again at
the next progress update and before publishing, so a SIGTERM/SIGINT never ends in a published output."""
from __future__ import annotations

import io
import signal

import pytest

from adaptkit import errors
from adaptkit.io.atomic import publish
from adaptkit.progress import Progress


@pytest.fixture
def pending():
    def set_(sig):
        errors.note_signal(sig)

    yield set_
    errors._pending_signal = None


def test_progress_update_raises_a_pending_sigterm(pending) -> None:
    bar = Progress(10, "x", stream=io.StringIO())
    bar.update(1)
    pending(signal.SIGTERM)
    with pytest.raises(errors.Terminated):
        bar.update(2)


def test_publish_refuses_after_a_swallowed_sigint(pending, tmp_path) -> None:
    tmp = tmp_path / ".t.adaptkit-tmp-1"
    tmp.mkdir()
    (tmp / "a.txt").write_text("x")
    pending(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as exc:
        publish(tmp, tmp_path / "out", force=False)
    assert not isinstance(exc.value, errors.Terminated)
    assert not (tmp_path / "out").exists()


def test_nothing_pending_nothing_raised(tmp_path) -> None:
    assert errors._pending_signal is None
    errors.raise_if_signalled()
    tmp = tmp_path / ".t.adaptkit-tmp-2"
    tmp.mkdir()
    publish(tmp, tmp_path / "out", force=False)
    assert (tmp_path / "out").is_dir()
