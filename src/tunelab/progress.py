"""Progress bars for the phases outside the training loop (conversion, evaluation, forgetting), so the
terminal is never silent for long: a tqdm bar on the main process's stderr, nothing on other ranks or when
``TUNELAB_PROGRESS=0``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def is_main_process() -> bool:  # as tunelab.runtime's; not imported from there, which imports the config
    return int(os.environ.get("RANK", "0")) == 0


def enabled() -> bool:
    return is_main_process() and os.environ.get("TUNELAB_PROGRESS", "1") != "0"


class Bar:
    """A bar over ``total`` units (prompts, batches) that the caller advances."""

    def __init__(self, desc: str, total: int, unit: str = "it"):
        self._bar = None
        if enabled() and total:
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
    """One line for a phase without steps to count (e.g. a one-off conversion)."""
    if is_main_process():
        print(line, flush=True)
