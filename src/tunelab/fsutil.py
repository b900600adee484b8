"""Writing directories so that nothing half-written is ever left where a reader looks."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(target: Path, *, keep_existing: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success rename it to ``target``.

    On an exception the temporary directory is removed and ``target`` is untouched. A ``target`` that
    exists at the end is replaced, unless ``keep_existing(target)`` says to keep it (e.g. a complete copy
    another process wrote meanwhile), in which case the new copy is discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        normal_permissions(tmp)
        if target.exists():
            if keep_existing is not None and keep_existing(target):
                return
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def normal_permissions(root: Path) -> None:
    """Give ``root`` and everything under it the permissions a plain ``mkdir`` / ``open`` would have under
    the process's umask: ``mkdtemp`` makes directories 0700 and some writers make files 0600, which would
    leave a model that another user or a serving process cannot read."""
    mask = umask()
    root.chmod(0o777 & ~mask)
    for p in root.rglob("*"):
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
