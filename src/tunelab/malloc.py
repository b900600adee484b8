"""Which C allocator serves the process's ``malloc``: the ``tunelab`` command runs under a size-class
allocator (tcmalloc, else jemalloc) where the system has one, as PyTorch's own CPU launcher
(``torch.backends.xeon.run_cpu``) does.

A training step on CPU allocates and frees its activations, of many sizes, from the C allocator. glibc's
heap keeps free chunks between them that the next step's tensors do not fit: LoRA on the demo's tickets
peaked at 2,145-2,204 MB resident under glibc and 1,777 MB under tcmalloc, whose blocks come in size
classes (docs/performance.md, "The C allocator"). An allocator replaces glibc's only when it is loaded
before anything else (``LD_PRELOAD``), so :func:`preload` runs the command again, at once, with it
preloaded: the same process (``exec``), before torch is imported. ``TUNELAB_MALLOC`` chooses: ``auto``
(the default: tcmalloc, else jemalloc, else the C library's own), ``tcmalloc``, ``jemalloc`` (an error
where it is not installed) or ``system`` (the C library's). The Python API runs under whatever allocator
its process has; ``summary.json`` records it (``levers.malloc``).

Stdlib only: this module runs before anything heavy is imported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

#: ``TUNELAB_MALLOC``'s values beside ``auto`` and ``system``, each with the library names it is found by
#: (``ctypes.util.find_library``), in the order ``auto`` tries them
LIBRARIES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
#: where each is installed from on Debian (``make install`` does so where it can)
PACKAGES = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}
#: set in the environment of the run again: the process id, the settings added (``_SETTINGS``) and the
#: ``LD_PRELOAD`` it had before
_MARK = "TUNELAB_MALLOC_PRELOADED"
#: a symbol only each allocator defines, to tell which one serves ``malloc``
_SYMBOLS = {"tcmalloc": "tc_malloc", "jemalloc": "mallctl", "mimalloc": "mi_malloc"}
#: the environment each is run with, unless the user set it: tcmalloc reports every allocation over 1 GiB
#: on stderr; jemalloc with the options torch's launcher sets (a background thread returns freed memory)
_SETTINGS = {
    "tcmalloc": {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 62)},
    "jemalloc": {"MALLOC_CONF": "oversize_threshold:1,background_thread:true,metadata_thp:auto"},
}


#: why the glibc lever (``training.allocator``) stays off under each other allocator
WHY = {"system": "the C library is not glibc"} | {
    name: f"the process allocates with {name}, which keeps freed memory by size itself"
    for name in ("tcmalloc", "jemalloc", "mimalloc")
}


@functools.cache
def _process() -> ctypes.CDLL | None:
    """The process's own symbols (its C library and what was preloaded); None where it has no such handle
    (Windows). Opened once: a lookup searches the libraries loaded by then, so a later one is found too."""
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):
        return None


def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (whose ``mallopt`` the allocator lever sets), else None."""
    libc = _process()
    symbols = ("gnu_get_libc_version", "mallopt", "malloc_trim")  # present in glibc only
    return libc if libc is not None and all(hasattr(libc, s) for s in symbols) else None


def in_use() -> str:
    """The allocator serving this process's ``malloc``: tcmalloc, jemalloc or mimalloc (preloaded), glibc,
    or ``system`` (another C library's)."""
    process = _process()
    for name, symbol in _SYMBOLS.items():
        if process is not None and hasattr(process, symbol):
            return name
    return "glibc" if glibc() is not None else "system"


def release() -> None:
    """Hand the memory the allocator holds free back to the system (between runs in one process, so that
    the next run's peak is its own)."""
    process, serving = _process(), in_use()
    if serving == "tcmalloc":
        process.MallocExtension_ReleaseFreeMemory()
    elif serving == "jemalloc":  # MALLCTL_ARENAS_ALL (4096): every arena
        process.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
    elif serving == "glibc":
        process.malloc_trim(ctypes.c_size_t(0))


def choice() -> str:
    """``TUNELAB_MALLOC``, checked: a value it cannot take is a :class:`ValueError` saying which it can."""
    want = os.environ.get("TUNELAB_MALLOC", "auto").strip() or "auto"
    allowed = ("auto", *LIBRARIES, "system")
    if want not in allowed:
        raise ValueError(f"TUNELAB_MALLOC={want}: allowed values are {', '.join(allowed)}")
    return want


def find(want: str) -> tuple[str, str] | None:
    """The allocator ``want`` (``auto``: the first installed) and its library, or None."""
    for name, libraries in LIBRARIES.items():
        if want in ("auto", name):
            for library in libraries:
                found = ctypes.util.find_library(library)
                if found:
                    return name, found
    return None


def preload() -> None:
    """Run this command again at once, in the same process, with the allocator ``TUNELAB_MALLOC`` chooses
    preloaded; return when it already runs under it (or under one the user preloaded), or when none is
    wanted or found (``auto``). In the run again the environment is put back as it was, so that the
    processes it starts (compile workers, a browser) get the user's. A :class:`ValueError` for a value
    ``TUNELAB_MALLOC`` cannot take or a library that is not installed."""
    want = choice()
    mark = os.environ.pop(_MARK, None)
    if mark is not None and mark.count(":") >= 2:
        pid, added, before = mark.split(":", 2)
        if pid == str(os.getpid()):  # this is the run again
            for key in filter(None, added.split(",")):
                os.environ.pop(key, None)
            if before:
                os.environ["LD_PRELOAD"] = before
            else:
                os.environ.pop("LD_PRELOAD", None)
            return
    if want == "system" or not sys.platform.startswith("linux") or in_use() != "glibc":
        return
    found = find(want)
    if found is None:
        if want == "auto":
            return
        raise ValueError(
            f"TUNELAB_MALLOC={want}: no lib{LIBRARIES[want][0]} is installed (Debian: apt-get install "
            f"{PACKAGES[want]}); allowed values are auto, {', '.join(LIBRARIES)}, system"
        )
    name, library = found
    before = os.environ.get("LD_PRELOAD", "")
    added = [key for key in _SETTINGS[name] if key not in os.environ]
    env = {**_SETTINGS[name], **os.environ}
    env["LD_PRELOAD"] = f"{library}:{before}" if before else library
    env[_MARK] = f"{os.getpid()}:{','.join(added)}:{before}"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:  # not allowed to run again: go on under the C library's
        pass
