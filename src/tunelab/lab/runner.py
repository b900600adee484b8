"""Running one run of a comparison (a variant's seed, or a search candidate): in this process, or in a fresh
spawned one so that its peak memory and speed are its own and a crash ends only that run."""

from __future__ import annotations

import multiprocessing
import os

from tunelab.errors import first_line
from tunelab.lab.search import Cut, stop_at
from tunelab.modes import train


def run_here(cfg, resume: bool, callbacks: list | None, stop: Cut | None = None, overwrite: bool = False):
    """Train one variant in this process (cut where ``stop`` says, for a search); its error line, or None."""
    try:
        train(
            cfg,
            resume=resume,
            overwrite=overwrite,
            callbacks=[*(callbacks or []), *([stop_at(*stop)] if stop else [])],
        )
    except KeyboardInterrupt:  # tunelab's Interrupted is one too: the comparison stops where it stands
        raise
    except Exception as e:
        return f"{type(e).__name__}: {first_line(e)}"
    return None


def _stop_with_parent() -> None:
    """If the comparison's process dies (kill -9), stop this run as Ctrl-C would, instead of training on as
    an orphan that holds its run dir: Linux sends SIGTERM on the parent's death (``PR_SET_PDEATHSIG``), and
    SIGTERM stops the run cleanly, its checkpoints kept for the rerun."""
    import ctypes
    import signal

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the orphan trains on, and the rerun finds its dir held
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        raise KeyboardInterrupt


def _child(cfg, resume: bool, conn, stop: Cut | None = None, overwrite: bool = False) -> None:
    from tunelab.progress import set_verbosity

    set_verbosity(os.environ.get("TUNELAB_VERBOSITY", "normal"))  # as the parent's -q / -v said
    try:
        _stop_with_parent()
        conn.send(run_here(cfg, resume, None, stop, overwrite))
    except KeyboardInterrupt:
        try:
            conn.send(INTERRUPTED)
        except OSError:  # the parent is gone
            pass
    finally:
        conn.close()


INTERRUPTED, DIED = "\0interrupted", "\0died"  # the child's other answers (an error line never starts with NUL)


def run_in_child(cfg, resume: bool, stop: Cut | None = None, overwrite: bool = False) -> str | None:
    """Train one variant in a fresh process (spawned: nothing inherited but the config), so that its peak
    memory, its speed and whatever it leaves behind are its own, and a crash or the kernel's OOM killer
    ends that variant only. The child shares the terminal (progress bars) and the process group (Ctrl-C
    stops both). Its error line, or None."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(cfg, resume, send, stop, overwrite), name="tunelab-variant")
    child.start()
    send.close()
    try:
        message = receive.recv()  # the child's one message: its error line, None, or INTERRUPTED
    except EOFError:  # it died without a word: a signal (kill -9, the OOM killer) or a crash
        message = DIED
    except KeyboardInterrupt:
        child.join()  # it got the same Ctrl-C; let it stop where it stands (its checkpoints stay)
        raise
    child.join()
    if message == INTERRUPTED:
        raise KeyboardInterrupt
    if message == DIED:
        code = child.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return f"the variant's process died ({how}; out of memory?)"
    return message
