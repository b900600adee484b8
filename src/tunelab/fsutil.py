"""Writing directories so that nothing half-written is ever left where a reader looks."""

from __future__ import annotations

import errno
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
        try:
            yield tmp
        except Exception as e:  # noqa: BLE001 - writers' own error types (SafetensorError) hold a full disk too
            reason = write_failure(e, target.parent)
            if reason is None:
                raise
            from tunelab.errors import RunError

            raise RunError(f"writing {target} failed: {reason}; nothing was half-written") from None
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


# What the writers say when a write fails: torch's C++ archive writer reports a full disk as a failed stream
# or a short position, safetensors as the OS error text.
_WRITE_FAILED = ("iostream error", "unexpected pos", "PytorchStreamWriter failed", "file write failed")
_NO_SPACE = ("No space left on device", "os error 28")
#: Below this much free space a failed write is put down to a full disk.
FULL_BELOW = 64 * 2**20


def write_failure(e: BaseException, where: Path) -> str | None:
    """A failed write said plainly, or None when ``e`` is not one: a full disk named as such (ENOSPC, with
    the free space left on the file system of ``where``), whatever the writer called it."""
    text = str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or any(x in text for x in _NO_SPACE):
        return f"no space left on device (ENOSPC) on the file system of {where}; free some space"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    if not any(x in text for x in _WRITE_FAILED):
        return None
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    if free is not None and free < FULL_BELOW:
        return (
            f"no space left on device (ENOSPC): {free / 2**20:.1f} MB free on the file system of {where}; "
            "free some space"
        )
    return f"the write failed ({text.strip().splitlines()[0]})"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over: readers see the old file or
    the new one, never half of it."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """:func:`write_text_atomic` for bytes (a PNG)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
