"""Errors a user can cause or must act on. The CLI prints each as one line and exits with ``exit_code``.

Exit codes (docs/reliability.md): 1 a comparison finished with variants that failed, died or whose files
are broken (its report is written); 2 bad input or an unusable output place; 3 training diverged (a
non-finite loss, gradient or weight; nothing non-finite is saved); 4 another process of a multi-process run
stopped (killed, crashed), so this one stopped too (resumable like an interrupt); 130 interrupted
(SIGINT/SIGTERM).
"""

from __future__ import annotations


class RunError(RuntimeError):
    """A run cannot start or go on as asked (occupied output dir, missing run, ...)."""

    exit_code = 2


class Unfinished(RunError):
    """A comparison whose report is written, but some of whose variants gave no result (failed, died, broken
    files, not run): a script or CI job must not read it as a success."""

    exit_code = 1


class ModelError(RunError):
    """A model directory that cannot be used safely: unreadable files, weights that do not match the
    config, file references outside the directory, pickled weights without opt-in, remote code."""


class NonFiniteError(RunError):
    """Training produced a non-finite loss, gradient norm or weight; the run stopped before using it."""

    exit_code = 3


class PeerLost(RunError):
    """Another process of a multi-process run (torchrun) stopped, killed or crashed, and this one's
    communication with it failed: this process stops too, and the run resumes from its last checkpoint."""

    exit_code = 4


class Interrupted(RunError, KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; the message says how to resume. Still a KeyboardInterrupt, so
    code that catches Ctrl-C around ``tunelab.train`` keeps working."""

    exit_code = 130


def first_line(e: BaseException) -> str:
    """An exception from a library as one line for a user error message: its first line, or its type."""
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


#: What gloo and NCCL say when the process at the other end of a collective is gone.
_PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Connection refused",
    "NCCL communicator was aborted",
)


def lost_peer(e: BaseException) -> str | None:
    """Why ``e`` says another process of this run is gone (a failed collective), or None: only inside a
    multi-process run, for the process group's own errors or their words."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    text = str(e)
    said = next((x for x in _PEER_GONE if x in text), None)
    if said is None and not isinstance(e, getattr(dist, "DistBackendError", ())):
        return None
    return said or first_line(e)
