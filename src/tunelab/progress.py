"""Progress bars for the phases outside the training loop (conversion, evaluation, forgetting), so the
terminal is never silent for long: a tqdm bar on the main process's stderr, nothing on other ranks or when
``TUNELAB_PROGRESS=0``; and how much a run says (:func:`set_verbosity`: ``tunelab -q`` / ``-v``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def is_main_process() -> bool:  # as tunelab.runtime's; not imported from there, which imports the config
    return int(os.environ.get("RANK", "0")) == 0


def quiet() -> bool:
    return os.environ.get("TUNELAB_VERBOSITY") == "quiet"


def enabled() -> bool:
    return is_main_process() and not quiet() and os.environ.get("TUNELAB_PROGRESS", "1") != "0"


def set_verbosity(level: str) -> None:
    """``quiet``: no bars, no status lines, libraries only say errors (the result and errors still print);
    ``normal``: bars and status lines, libraries' warnings; ``verbose``: libraries' info logs too, and the
    deprecation warnings tunelab otherwise filters (tunelab/__init__.py). Kept in the environment, so child
    processes (``tunelab compare`` runs each variant in one) say as much."""
    import warnings

    os.environ["TUNELAB_VERBOSITY"] = level
    if level == "normal":
        return
    import datasets
    import transformers

    if level == "quiet":
        import functools

        import tqdm.std

        # libraries that draw their own tqdm bars (transformers' GGUF conversion does): none in this process
        tqdm.std.tqdm.__init__ = functools.partialmethod(tqdm.std.tqdm.__init__, disable=True)
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    elif level == "verbose":
        transformers.logging.set_verbosity_info()
        datasets.logging.set_verbosity_info()
        warnings.filterwarnings("default", category=FutureWarning)
        warnings.filterwarnings("default", category=DeprecationWarning)


class Bar:
    """A bar over ``total`` units (prompts, batches) that the caller advances; ``total=None``: a count and a
    rate, for a phase whose size is not known before it ends (reading a file)."""

    def __init__(self, desc: str, total: int | None, unit: str = "it"):
        self._bar = None
        if enabled() and total != 0:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextlib.contextmanager
def bar(desc: str, total: int, unit: str = "it") -> Iterator[Bar]:
    b = Bar(desc, total, unit)
    try:
        yield b
    finally:
        b.close()


def track(items: Iterable[T], desc: str, total: int, unit: str = "it") -> Iterator[T]:
    """``items``, advancing a bar by one per item."""
    with bar(desc, total, unit) as b:
        for x in items:
            yield x
            b.update()


def status(line: str) -> None:
    """One line for a phase without steps to count (e.g. a one-off conversion); none under ``-q``."""
    if is_main_process() and not quiet():
        from tqdm import tqdm

        tqdm.write(line)  # on a line of its own, above a bar that is running (stdout, as print)
