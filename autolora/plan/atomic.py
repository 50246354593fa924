"""One way to write a folder atomically: fill a temporary folder beside it, fsync, rename.

Both checkpoints and exports are folders of several files that must appear whole or not at
all. :func:`atomic_dir` yields a temporary folder next to the target; when the block succeeds,
every file in it is flushed to disk and it replaces the target in one ``os.replace``. A crash,
or an exception in the block, leaves the target as it was and removes the temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and Windows, for folders) cannot fsync a folder
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename.

    An existing ``path`` is replaced (the caller decides whether that is allowed). The files are
    fsynced before the rename and the parent folder after it, so the new folder survives a
    power cut once the block has returned.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / "x")
    os.replace(tmp, path)
    _fsync(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
