"""One way to write a folder atomically: fill a temporary folder beside it, fsync, rename.

Both checkpoints and exports are folders of several files that must appear whole or not at
all. :func:`atomic_dir` yields a temporary folder next to the target; when the block succeeds,
every file in it is flushed to disk and it replaces the target. A crash, or an exception in the
block, leaves the target as it was and removes the temporary folder.

Replacing an existing folder is one atomic exchange (``renameat2(RENAME_EXCHANGE)``) where the
system has it (Linux). Elsewhere it takes two renames (the old folder aside, the new one in);
a process killed between them leaves the old folder in ``.<name>.old-<pid>-*``, and the next
:func:`recover` (every write and every target check calls it) puts it back. Temporary folders
are named ``.<name>.tmp-<pid>-*``; those of processes that are gone are removed on the next
write into the same parent folder.

A write that fails for a file-system reason (read-only or full disk, a file where a folder
should be) raises one :class:`~autolora.errors.WriteError` naming the path.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from autolora.errors import WriteError

_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and Windows, for folders) cannot fsync a folder
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def recover(path: str | os.PathLike) -> None:
    """Finish what a killed writer left beside ``path``: put back an old folder that was moved
    aside and never replaced, and remove temporary and old folders of processes that are gone."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        m = _STALE.match(entry.name)
        if m is None or _alive(int(m["pid"])):
            continue
        target = parent / m["name"]
        if m["kind"] == "old" and (entry / "x").exists() and not target.exists():
            os.replace(entry / "x", target)  # killed between the two renames: the old one is still good
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _is_write_fault(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return True
    name = type(e).__name__
    return name == "SafetensorError" or (isinstance(e, RuntimeError) and "PytorchStreamWriter" in str(e))


def _write_error(path: Path, e: BaseException) -> WriteError:
    detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return WriteError(
        f"cannot write {str(path)!r} ({detail}); check that the folder is writable, the disk is not full and "
        "no file is in the way. Nothing was left half-written there."
    )


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` atomically.

    An existing ``path`` is replaced (the caller decides whether that is allowed). The files are
    fsynced before the rename and the parent folder after it, so the new folder survives a
    power cut once the block has returned.

    Raises:
        WriteError: for a file-system fault, naming ``path`` (the target is left as it was).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recover(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        _fsync(tmp)
        if path.exists() and _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        else:
            _replace(tmp, path)
        _fsync(path.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_fault(e):
            raise _write_error(path, e) from None
        raise


def _replace(tmp: Path, path: Path) -> None:
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
        os.replace(path, old / "x")
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old / "x", path)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it replaces ``path`` in one rename.

    Raises:
        WriteError: for a file-system fault, naming ``path``.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _is_write_fault(e):
            raise _write_error(path, e) from None
        raise
