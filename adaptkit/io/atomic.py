"""Atomic publication of an output folder.

Everything is written into ``.<target>.adaptkit-tmp-<random>`` beside the target; on success every file and
the folder are fsynced and the folder is renamed into place in one step, so a crash at any moment leaves
either no target (or the previous one, with ``force``) or a complete one. Protocol: specs/checkpoint-io.md.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from adaptkit.errors import OutputError, raise_if_signalled

TMP_MARK = ".adaptkit-tmp-"

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}{TMP_MARK}"


def _is_real_dir(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink()


def _dir_is_empty(p: Path) -> bool:
    with os.scandir(p) as it:
        return next(it, None) is None


def _nearest_existing(p: Path) -> Path:
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output_target(target: str | os.PathLike[str], force: bool = False) -> None:
    """Raise ``OutputError`` now if ``target`` cannot be (re)placed: it exists and is not an empty folder and
    ``force`` is off, it is a dangerous folder to replace, or its parent is not a writable folder."""
    shown = str(target)
    t = Path(os.path.abspath(target))
    if Path(target).name in ("", ".", "..") or t == t.parent:
        raise OutputError(f"{shown}: not a valid output folder name")
    if os.path.lexists(t):
        if _is_real_dir(t):
            try:
                empty = _dir_is_empty(t)
            except OSError as e:
                raise OutputError(f"{shown}: cannot list the existing folder ({e.strerror})") from None
            if not empty and not force:
                raise OutputError(f"{shown} exists and is not empty; pass --force to replace it")
        elif not force:
            kind = "a symbolic link" if t.is_symlink() else "not a folder"
            raise OutputError(f"{shown} exists and is {kind}; pass --force to replace it")
        if force:
            real = t.resolve()
            cwd = Path.cwd().resolve()
            if real == cwd or real in cwd.parents:
                raise OutputError(f"refusing to replace {shown}: it contains the current directory")
            if real == Path.home().resolve():
                raise OutputError(f"refusing to replace {shown}: it is the home directory")
    anc = _nearest_existing(t.parent)
    if not anc.is_dir():
        raise OutputError(f"cannot create {shown}: {anc} is not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {shown}: parent folder {anc} is not writable")
    probe = anc / f".adaptkit-probe-{secrets.token_hex(6)}"
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        raise OutputError(f"cannot create {shown}: parent folder {anc} is not writable ({e.strerror})") from None


def _remove(p: Path) -> None:
    if _is_real_dir(p):
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def _try_lock(p: Path) -> int | None:
    """An fd holding an exclusive flock on ``p``, or None if someone else holds it (or it vanished)."""
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def clean_stale(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary folders that killed runs (SIGKILL, power loss) left beside ``target``: every
    ``.<name>.adaptkit-tmp-*`` entry in ``target``'s folder that no live process holds locked (a running
    publication keeps an exclusive ``flock`` on its folder until it is renamed into place)."""
    t = Path(os.path.abspath(target))
    removed: list[Path] = []
    try:
        entries = [e for e in os.scandir(t.parent) if e.name.startswith(".") and TMP_MARK in e.name]
    except OSError:
        return removed
    for e in entries:
        p = Path(e.path)
        fd = _try_lock(p)
        if fd is None:
            if not _is_real_dir(p) and os.path.lexists(p):  # a stray file: nobody locks files
                _remove(p)
                removed.append(p)
            continue  # a live run is writing it (or it is already gone)
        try:
            _remove(p)
            removed.append(p)
        finally:
            os.close(fd)
    return removed


def _make_tmp(t: Path) -> tuple[Path, int]:
    for _ in range(100):
        tmp = t.parent / f"{_tmp_prefix(t)}{secrets.token_hex(6)}"
        try:
            os.mkdir(tmp, 0o777)  # the umask applies, as for any folder the user creates
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(f"cannot create a temporary folder beside {t} ({e.strerror})") from None
        fd = _try_lock(tmp)
        if fd is None:
            continue  # a concurrent cleaner took it; try another name
        if os.fstat(fd).st_nlink == 0:  # removed between mkdir and lock
            os.close(fd)
            continue
        return tmp, fd
    raise OutputError(f"cannot create a temporary folder beside {t}")  # pragma: no cover


def _fsync_path(p: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(p, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every regular file and folder under ``root`` (symlinks are not followed)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(dirpath), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically swap ``a`` and ``b``; False if the kernel, libc or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_parent(t: Path) -> None:
    with contextlib.suppress(OSError):
        _fsync_path(t.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def publish(tmp: Path, target: Path, *, force: bool, shown: str | None = None) -> None:
    """fsync ``tmp`` and rename it to ``target`` (replacing an existing one only with ``force``)."""
    shown = shown or str(target)
    raise_if_signalled()  # an interrupt that was swallowed somewhere must not publish
    fsync_tree(tmp)
    raise_if_signalled()
    replace = os.path.lexists(target) and not (_is_real_dir(target) and _dir_is_empty(target))
    if replace and not force:
        raise OutputError(f"{shown} exists and is not empty; pass --force to replace it")
    try:
        if replace:
            if _renameat2_exchange(tmp, target):
                _fsync_parent(target)
                _remove(tmp)  # tmp now holds the previous target
                return
            aside = target.parent / f"{_tmp_prefix(target)}{secrets.token_hex(6)}-old"
            os.rename(target, aside)
            os.rename(tmp, target)
            _fsync_parent(target)
            _remove(aside)
            return
        os.rename(tmp, target)  # also atomically replaces an empty folder
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise OutputError(f"{shown} exists and is not empty; pass --force to replace it") from None
        raise OutputError(f"cannot publish {shown} ({e.strerror})") from None
    _fsync_parent(target)


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; publish it atomically as ``target`` when the block
    succeeds, delete it when the block raises. Refuses a non-empty existing target unless ``force``."""
    shown = str(target)
    t = Path(os.path.abspath(target))
    check_output_target(target, force)
    try:
        t.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {shown}: {e.strerror}") from None
    clean_stale(t)
    tmp, lock_fd = _make_tmp(t)
    try:
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            publish(tmp, t, force=force, shown=shown)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        os.close(lock_fd)
