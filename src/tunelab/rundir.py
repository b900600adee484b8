"""The run directory: what tunelab may write, replace or delete there, and who holds it.

Promises (docs/reliability.md):

- **A marker proves a run is ours.** Every run dir holds ``.tunelab-run`` (JSON: version, status, PID). A
  directory is replaced only when it has the marker *and* every top-level entry is a name tunelab writes
  (:data:`OURS`); anything else in it (a user's notes, data, a thesis) makes tunelab refuse, listing it.
- **Never the places users live in.** ``/``, ``$HOME``, the current directory and its parents are never
  replaced, marker or not.
- **The old run is kept until the new one is known good.** :meth:`RunDir.claim` only checks and locks;
  the old run's files are deleted by :meth:`RunDir.begin`, which runs after model, data and strategies
  loaded. A setup that fails calls :meth:`RunDir.abandon`, which leaves the directory as it found it.
- **One process per run dir.** ``.tunelab.lock`` is held with ``flock`` for the whole run; the kernel
  drops it when the process dies (even ``kill -9``), so a lock file left by a dead process is stale by
  construction and is simply taken over. A live holder is named by PID in the refusal.
- **A run that stops because another of its processes died** (torchrun) records ``interrupted`` and says how
  to resume (:class:`tunelab.errors.PeerLost`, exit code 4).
- **A run that left nothing to resume does not block the next one.** A run dir of ours with no complete
  checkpoint and no final model (a setup or an early crash) is replaced by the next run without
  ``--overwrite``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.checkpoints import list_checkpoints
from tunelab.errors import Interrupted, NonFiniteError, PeerLost, RunError, lost_peer

CONFIG, SUMMARY, METRICS, MODEL, CHECKPOINTS = (
    "config.yaml",
    "summary.json",
    "metrics.jsonl",
    "model",
    "checkpoints",
)
MARKER, LOCK = ".tunelab-run", ".tunelab.lock"
PREDICTIONS = "predictions"  #: every scored eval row's answer, one JSON Lines file per split (evaluate.py)
MANIFEST = "tunelab.json"  #: in MODEL/: what kind of artefact it is and what loads it (artefacts.py)
#: Every top-level name a run writes. Anything else in a run dir was put there by someone else.
OURS = frozenset(
    {
        CONFIG,
        SUMMARY,
        METRICS,
        MODEL,
        CHECKPOINTS,
        "tb",
        "mlruns",
        "tasks",
        "continual.json",
        "continual.png",
        "layers.json",
        "compile.json",
        PREDICTIONS,
        MARKER,
        LOCK,
    }
)


def _is_ours(name: str) -> bool:
    # temporary names of atomic writes: ".model-xxxx" (atomic_dir), "summary.json.tmp" (write_json_atomic)
    return name in OURS or name.startswith(f".{MODEL}-") or (name.endswith(".tmp") and name[:-4] in OURS)


class RunDirBusy(RunError):
    """Another live process holds the run dir."""


def _protected(path: Path) -> str | None:
    """Why ``path`` must never be replaced, or None."""
    p, cwd = path.resolve(), Path.cwd().resolve()
    if p == Path(p.anchor):
        return "it is the file-system root"
    if p == Path.home().resolve():
        return "it is your home directory"
    if p == cwd:
        return "it is the current directory"
    if p in cwd.parents:
        return "it contains the current directory"
    return None


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tunelab_run") == 1 else None


def is_run_dir(path: Path) -> bool:
    """``path`` is (or was) a tunelab run directory, finished or not: its marker, its config or its
    checkpoints are there. Read-back verbs then treat it as a run, never as a bare model."""
    path = Path(path)
    return (path / MARKER).is_file() or (path / CONFIG).is_file() or (path / CHECKPOINTS).is_dir()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, newest first."""
    return [c.path for c in list_checkpoints(run_dir / CHECKPOINTS) if c.complete]


@dataclass
class RunDir:
    """A claimed (locked) run directory. Create with :meth:`claim`; then :meth:`begin` or :meth:`abandon`."""

    path: Path
    replace: bool  # the old run's files are deleted by begin()
    created: Path | None  # the topmost folder claim() created (abandon() removes it again)
    _lock: Any = field(default=None, repr=False)
    _begun: bool = False

    # -- claiming -------------------------------------------------------------------------------
    @classmethod
    def claim(
        cls, output_dir: str | os.PathLike, *, resume: bool, overwrite: bool, config: dict[str, Any] | None = None
    ) -> RunDir:
        """Check that the run may use ``output_dir`` and lock it. Writes nothing but the lock file.

        With ``resume``, ``config`` (the resolved config) must equal the one the run was started with."""
        path = Path(output_dir)
        if path.exists() and not path.is_dir():
            raise RunError(f"output_dir {path} is a file, not a directory; choose a directory for the run")
        entries = sorted(e.name for e in path.iterdir()) if path.is_dir() else []
        replace = False
        if resume:
            if not (path / CONFIG).is_file() or _read_marker(path) is None:
                raise RunError(f"--resume: {path} holds no tunelab run to resume (no {CONFIG} and {MARKER})")
            if config is not None:
                changed = _diff(yaml.safe_load((path / CONFIG).read_text()), config)
                if changed:
                    raise RunError(
                        f"--resume: the config differs from the one {path} was started with: " + "; ".join(changed)
                    )
        elif entries:
            marker = _read_marker(path)
            if marker is None:
                raise RunError(
                    f"output_dir {path} is not empty and is not a tunelab run (no {MARKER} marker); "
                    "tunelab does not replace it: choose another output_dir"
                )
            foreign = [e for e in entries if not _is_ours(e)]
            if foreign:
                raise RunError(
                    f"output_dir {path} holds files tunelab did not write ({', '.join(foreign[:5])}"
                    f"{', ...' if len(foreign) > 5 else ''}); tunelab does not replace it: move them or choose "
                    "another output_dir"
                )
            resumable = bool(complete_checkpoints(path)) or (path / MODEL).is_dir()
            if resumable and not overwrite:
                _refuse_if_held(path / LOCK)  # a run in progress there: say so, not "use --resume"
                raise RunError(
                    f"output_dir {path} holds a tunelab run; use --resume to continue it, --overwrite to "
                    "replace it, or choose another output_dir"
                )
            why = _protected(path)
            if why:
                raise RunError(f"output_dir {path}: tunelab never replaces this directory ({why}); choose another")
            replace = True
        missing = [d for d in (path, *path.parents) if not d.exists()]
        created = missing[-1] if missing else None
        try:
            path.mkdir(parents=True, exist_ok=True)
            run = cls(path, replace, created)
            run._lock = _acquire(path / LOCK)
        except RunDirBusy:
            raise
        except OSError as e:
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise RunError(f"output_dir {path}: cannot write there ({e.strerror})") from None
        return run

    # -- using ----------------------------------------------------------------------------------
    def begin(self, resolved_config: dict[str, Any], *, resume: bool = False) -> None:
        """Setup succeeded: delete the old run (if replacing), write the marker and the resolved config."""
        if self.replace:
            for e in self.path.iterdir():
                if e.name == LOCK or not _is_ours(e.name):
                    continue
                if e.is_dir() and not e.is_symlink():
                    shutil.rmtree(e)
                else:
                    e.unlink()
        self._begun = True
        self.set_status("running")
        if not resume:
            _write_atomic(self.path / CONFIG, yaml.safe_dump(resolved_config, sort_keys=False))

    def set_status(self, status: str) -> None:
        marker = {
            "tunelab_run": 1,
            "status": status,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "time": time.time(),
        }
        _write_atomic(self.path / MARKER, json.dumps(marker, indent=1) + "\n")

    def close(self, status: str) -> bool:
        """End the claim. Before :meth:`begin` that is :meth:`abandon`; after it the marker records
        ``status`` (finished, failed, diverged, interrupted). Returns whether the run had begun."""
        began = self._begun
        if began:
            self.set_status(status)
            self.release()
        else:
            self.abandon()
        return began

    def abandon(self) -> None:
        """Setup failed before :meth:`begin`: leave the directory as claim() found it."""
        self.release()
        if self._begun:
            return
        lock = self.path / LOCK
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
        elif lock.exists() and not self.replace and not any(e.name != LOCK for e in self.path.iterdir()):
            lock.unlink(missing_ok=True)  # an empty directory the user made stays empty

    def release(self) -> None:
        if self._lock is not None:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_UN)
            finally:
                self._lock.close()
                self._lock = None


def _acquire(lock_path: Path):
    """Hold ``lock_path`` with flock; a live holder is named in the refusal."""
    f = open(lock_path, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _busy(f, lock_path)
    f.seek(0)
    f.truncate()
    f.write(f"pid={os.getpid()} host={socket.gethostname()} since={int(time.time())}\n")
    f.flush()
    return f


def _busy(f, lock_path: Path):
    """Close ``f`` (the lock file another process holds) and refuse, naming that process."""
    f.seek(0)
    holder = f.read().strip() or "unknown"
    f.close()
    info = dict(x.split("=", 1) for x in holder.split() if "=" in x)
    raise RunDirBusy(
        f"output_dir {lock_path.parent} is in use by another tunelab process (PID {info.get('pid', '?')}"
        f" on {info.get('host', '?')}), which is training there now; wait for it to finish or stop it first"
    ) from None


def _refuse_if_held(lock_path: Path) -> None:
    """Refuse when a live process holds ``lock_path``; take nothing (the lock is released at once)."""
    if not lock_path.is_file():
        return
    try:
        f = open(lock_path)  # noqa: SIM115 - closed below or by _busy
    except OSError:
        return
    try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        _busy(f, lock_path)
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: was {a!r}, now {b!r}"]


# ----------------------------------------------------------------------------- how a run ends


@contextmanager
def guarded(run: RunDir | None, save_steps: int) -> Iterator[None]:
    """Close the claimed run dir whatever happens: a setup that fails leaves it as it was found; a run that
    stops (divergence, interrupt, error) records why in the marker and says how to go on; the lock is
    always released. ``run`` is None on ranks other than 0, which write nothing.

    While it records how the run ended, a SIGTERM or Ctrl-C is ignored: under torchrun the survivors of a killed
    worker get SIGTERM as their collective fails, and one landing while rank 0 wrote its message cut that
    message to a bare "interrupted", without the checkpoint to resume from."""
    try:
        yield
    except BaseException as e:
        with _signals_ignored():
            ended = _ended(run, save_steps, e)
        if ended is e:
            raise
        raise ended from None
    else:
        with _signals_ignored():
            if run is not None:
                run.close("finished")


def _ended(run: RunDir | None, save_steps: int, e: BaseException) -> BaseException:
    """What a run that stopped with ``e`` raises, its marker closed."""
    if isinstance(e, KeyboardInterrupt):
        if run is None:
            return Interrupted("interrupted")
        began = run.close("interrupted")
        return Interrupted(f"interrupted; {_how_to_go_on(run, save_steps, began)}")
    if isinstance(e, NonFiniteError):
        if run is None:
            return e
        _log_event(run.path, {"event": "diverged", "reason": str(e)})
        run.close("diverged")
        return NonFiniteError(
            f"{e}; no weights were saved as {MODEL}/. {_how_to_go_on(run, save_steps, True)} after lowering "
            "training.lr (or raising regularisation)"
        )
    why = lost_peer(e) if isinstance(e, Exception) else None
    if why is None:
        if run is not None:
            run.close("failed")
        return e
    # torchrun: another process died mid-collective. This one stops too, resumable as after an interrupt
    if run is None:
        return PeerLost(f"another process of this run stopped ({why}); this one stopped too")
    run.close("interrupted")
    return PeerLost(
        f"another process of this run stopped ({why}); this one stopped too. "
        f"{_how_to_go_on(run, save_steps, True)}"
    )


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """SIGTERM and SIGINT ignored for the block, in the main thread: the run is stopping already, and a signal
    held back instead would raise KeyboardInterrupt in place of the message as soon as it was let through."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # a handler installed from outside Python (getsignal gives None) could not be put back: left as it is
    signals = [n for n in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(n) is not None]
    before = {n: signal.signal(n, signal.SIG_IGN) for n in signals}
    try:
        yield
    finally:
        for n, handler in before.items():
            signal.signal(n, handler)


def _how_to_go_on(run: RunDir, save_steps: int, began: bool) -> str:
    if not began:
        return f"nothing was written to {run.path}"
    done = complete_checkpoints(run.path)
    if done:
        return f"{run.path} can continue from {done[0].name} with --resume"
    return f"no checkpoint was written yet (training.save_steps={save_steps}); run again to start over"


def _log_event(run_dir: Path, record: dict[str, Any]) -> None:
    metrics = run_dir / METRICS
    if metrics.exists():
        with metrics.open("a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")
