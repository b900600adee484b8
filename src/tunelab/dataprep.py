"""Rendering and tokenizing rows at the size users have: in batches (the chat template applied to a batch of
conversations at once, the tokenizer called on a batch), on every core for large inputs (forked workers,
a bounded number of chunks in flight), written as Arrow to disk as it goes and memory-mapped from there.

A prepared split is kept in ``TUNELAB_HOME/data/prepared/<key>/`` where the key digests everything the
result depends on: the file's bytes, which of its rows, the tokenizer (vocabulary, merges, template,
special tokens), the rendering options, ``max_length``, the data modules' source and the libraries'
versions. A second run on the same file, tokenizer and options (another seed, another variant of a
comparison, another search candidate) maps it in milliseconds. A key says nothing about what a strategy
does, so every strategy shares it.

Errors keep their place: chunks are processed and written in file order, and the first bad row (in that
order) raises :class:`~tunelab.sources.DataError` with its file and line, in a worker as in the main process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing as mp
import os
import signal
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.sources import DataError, Source, cache_dir, map_arrow, mapped, parsed

IGNORE = -100
CHUNK = 1024  #: rows per chunk handed to a worker (and per Arrow record batch)
POOL_MIN_ROWS = 16_384  #: fewer rows than this are prepared in the calling process (forking costs ~0.1 s)
PREP_VERSION = 1  #: bumped when what a row prepares to changes, so older caches are not reused
FEATURES = ("input_ids", "labels", "length", "class")


# ----------------------------------------------------------------------------- views of a prepared table


class Rows(Sequence):
    """The tokenized rows of a prepared split, as the sequence of dicts (``input_ids``, ``labels``,
    ``length``, and ``class`` for classification rows) that the rest of tunelab reads, over a
    memory-mapped Arrow table: nothing is held in Python objects until a row is asked for."""

    def __init__(self, table):
        self.table = table
        self.names = [k for k in FEATURES if k in table.column_names]

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1:
                return Rows(self.table.slice(start, max(0, stop - start)))
            return Rows(self.table.take(np.arange(start, stop, step)))
        i = _index(i, len(self))
        return {k: self.table.column(k)[i].as_py() for k in self.names}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.table.select(self.names).to_batches(CHUNK):
            cols = [batch.column(k).to_pylist() for k in self.names]
            for values in zip(*cols, strict=True):
                yield dict(zip(self.names, values, strict=True))

    def __add__(self, other) -> list:
        return list(self) + list(other)

    def __radd__(self, other) -> list:
        return list(other) + list(self)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None

    @property
    def lengths(self) -> np.ndarray:
        return self.table.column("length").to_numpy()

    def dataset(self):
        """The rows as a ``datasets.Dataset`` over the same Arrow buffers (no copy)."""
        import datasets

        # a fingerprint given: without one, datasets hashes the whole table to make one (a copy in memory)
        fingerprint = hashlib.blake2b(f"{id(self.table)}-{os.getpid()}".encode(), digest_size=8).hexdigest()
        return datasets.Dataset(
            datasets.table.InMemoryTable(self.table.select(self.names)), fingerprint=fingerprint
        )


class Column(Sequence):
    """One text column of a prepared split (the references) as a sequence of ``str | None``."""

    def __init__(self, table, name: str):
        self.table, self.name = table, name

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._values(self.table.slice(*_span(i, len(self))))
        return self._values(self.table.slice(_index(i, len(self)), 1))[0]

    def _values(self, t) -> list:
        return t.column(self.name).to_pylist()

    def __iter__(self):
        for batch in self.table.to_batches(CHUNK):
            yield from self._values(batch)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None


class Prompts(Column):
    """What scoring generates from: ``(prompt text, add special tokens)`` per row, or None."""

    def __init__(self, table):
        super().__init__(table, "prompt")

    def _values(self, t) -> list:
        prompts, special = t.column("prompt").to_pylist(), t.column("special").to_pylist()
        return [(p, s) if p is not None else None for p, s in zip(prompts, special, strict=True)]


def _index(i: int, n: int) -> int:
    if not -n <= i < n:
        raise IndexError(i)
    return i % n


def _span(s: slice, n: int) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError("a column of a prepared split is sliced without a step")
    return start, max(0, stop - start)


# ----------------------------------------------------------------------------- one chunk of rows


@dataclass
class Job:
    """What preparing a chunk needs (a forked worker inherits it): the formatter and the options."""

    formatter: Any  #: tunelab.data.Formatter
    max_length: int
    train_on: str
    columns: dict[str, str]
    skip_bad_rows: bool
    name: str  #: the source as errors name it
    shots_for: Callable[[str], list] | None = None  #: per-row shots (BM25): only in the calling process


def run_chunk(job: Job, idx: np.ndarray, lines: list, payloads: list) -> tuple[Any, list[str], str | None]:
    """(Arrow record batch of the good rows or None, skip reasons, the fatal error or None)."""
    n = len(payloads)
    errors: list[BaseException | None] = [None] * n
    rows: list[dict | None] = [None] * n
    for k, (line, p) in enumerate(zip(lines, payloads, strict=True)):
        try:
            rows[k] = mapped(parsed(job.name, line, p), job.columns)
        except DataError as e:
            errors[k] = e
    live = [k for k in range(n) if rows[k] is not None]
    rendered = job.formatter.render_many([rows[k] for k in live], job.shots_for)
    ok = []
    for k, r in zip(live, rendered, strict=True):
        if isinstance(r, BaseException):
            errors[k] = r
        else:
            ok.append((k, r))
    tokens = job.formatter.tokenize_many([r for _, r in ok], job.max_length, job.train_on)
    for (k, _), e in zip(ok, tokens.errors, strict=True):
        errors[k] = e
    skipped = []
    for k, e in enumerate(errors):
        if e is None:
            continue
        if isinstance(e, DataError):
            return None, skipped, str(e)
        where = f"{job.name}:{lines[k]}" if lines[k] is not None else f"{job.name}: row {int(idx[k]) + 1}"
        if not job.skip_bad_rows:
            return None, skipped, f"{where}: {e} (set data.skip_bad_rows: true to skip such rows)"
        skipped.append(f"{where}: {e}")
    good = [j for j, e in enumerate(tokens.errors) if e is None]
    if not good:
        return None, skipped, None
    return _batch([ok[j][1] for j in good], tokens.only(good), job.formatter.labels), skipped, None


def _batch(rendered: list, tokens, labels: list[str] | None):
    """The good rows of a chunk as an Arrow record batch (:func:`schema`)."""
    import pyarrow as pa

    offsets = pa.array(np.concatenate([[0], np.cumsum(tokens.lengths)]).astype(np.int32))
    cols = {
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(tokens.ids)),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(tokens.labels)),
        "length": pa.array(tokens.lengths.astype(np.int32)),
        "prompt": pa.array([r.prompt for r in rendered], pa.large_string()),
        "special": pa.array([r.special for r in rendered], pa.bool_()),
        "reference": pa.array([r.reference for r in rendered], pa.large_string()),
    }
    if labels is not None:
        cols["class"] = pa.array([labels.index(r.reference) if r.reference in labels else -1 for r in rendered],
                                 pa.int32())  # fmt: skip
    return pa.record_batch(list(cols.values()), names=list(cols))


# ----------------------------------------------------------------------------- all chunks, on every core

_JOB: Job | None = None  #: the job a forked worker runs (inherited, never pickled)


def _in_worker(args) -> tuple:
    return run_chunk(_JOB, *args)


def _worker_signals() -> None:
    """A worker leaves Ctrl-C to the process that forked it, and dies on the SIGTERM with which that process
    ends the pool (it inherited tunelab's SIGTERM handler, which would otherwise run and may miss the signal
    while the worker waits for a chunk, leaving the pool's join waiting forever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def workers(n_rows: int, job: Job) -> int:
    if n_rows < POOL_MIN_ROWS or job.shots_for is not None or "fork" not in mp.get_all_start_methods():
        return 1
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                      8))  # fmt: skip


def chunk_results(job: Job, source: Source, idx: np.ndarray) -> Iterator[tuple[int, tuple]]:
    """(rows in the chunk, run_chunk's result) for each chunk of ``idx``, in order."""
    chunks = source.chunks(idx, CHUNK)
    n = workers(len(idx), job)
    if n == 1:
        for c in chunks:
            yield len(c[0]), run_chunk(job, *c)
        return
    global _JOB
    _JOB = job
    # the tokenizers library warns in a forked child when the parent has used its threads; each worker
    # tokenizes on one thread (the workers are the parallelism), so say so before forking
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = mp.get_context("fork").Pool(n, initializer=_worker_signals)
    finally:
        _JOB = None
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    try:
        pending: deque = deque()
        for c in chunks:  # at most 2 chunks per worker in flight: memory stays flat whatever the file's size
            pending.append((len(c[0]), pool.apply_async(_in_worker, (c,))))
            if len(pending) >= 2 * n:
                size, res = pending.popleft()
                yield size, res.get()
        while pending:
            size, res = pending.popleft()
            yield size, res.get()
    finally:
        pool.terminate()
        pool.join()


# ----------------------------------------------------------------------------- the cache

_TOKENIZER_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_digest(tok) -> str:
    """What a tokenizer turns text into: its vocabulary, merges, normalizer and post-processor (the backend's
    JSON), its chat template and its special tokens."""
    try:
        return _TOKENIZER_DIGESTS[tok]
    except (KeyError, TypeError):
        pass
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tok.get_vocab().items())).encode())
    h.update(repr((type(tok).__name__, getattr(tok, "chat_template", None), tok.special_tokens_map)).encode())
    d = h.hexdigest()
    try:
        _TOKENIZER_DIGESTS[tok] = d
    except TypeError:
        pass
    return d


@functools.cache
def code_digest() -> str:
    """The source of the modules that decide what a row prepares to: a change there (in a checkout, between
    releases of the same version number) prepares the rows again instead of reading older ones."""
    h = hashlib.blake2b(digest_size=16)
    for name in ("data.py", "dataprep.py", "sources.py"):
        h.update(Path(__file__).with_name(name).read_bytes())
    return h.hexdigest()


def cache_key(source: Source, idx: np.ndarray, tok, options: dict[str, Any]) -> str | None:
    if source.digest is None:
        return None
    import tokenizers
    import transformers

    h = hashlib.blake2b(digest_size=20)
    h.update(np.ascontiguousarray(idx, dtype=np.int64).tobytes())
    blob = [PREP_VERSION, code_digest(), transformers.__version__, tokenizers.__version__, source.digest,
            source.name, len(idx), tokenizer_digest(tok), options]  # fmt: skip
    h.update(json.dumps(blob, sort_keys=True, default=str).encode())
    return h.hexdigest()


def load_cached(key: str | None) -> tuple[Any, dict] | None:
    if key is None:
        return None
    from tunelab.models import tunelab_home

    d = tunelab_home() / "data" / "prepared" / key
    try:
        meta = json.loads((d / "meta.json").read_text())
        return map_arrow(d / "features.arrow"), meta
    except (OSError, ValueError):
        return None


def write_prepared(key: str | None, schema, produce: Callable[[Callable], dict]) -> tuple[Any, dict]:
    """Run ``produce(write_batch)`` (it writes record batches of ``schema`` and returns the meta) into the
    cache entry for ``key``, renamed into place only when complete; without a key, or on a home that cannot
    be written, into a temporary directory whose file is mapped and then unlinked (the map keeps it
    readable)."""
    import tempfile

    import pyarrow as pa

    from tunelab.fsutil import atomic_dir

    def write(d: Path) -> dict:
        with pa.OSFile(str(d / "features.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
            meta = produce(w.write_batch)
        (d / "meta.json").write_text(json.dumps(meta))
        return meta

    prepared = cache_dir("prepared") if key is not None else None
    if prepared is not None:
        # another process that wrote the same entry meanwhile wrote the same bytes: either copy will do
        with atomic_dir(prepared / key, keep_existing=lambda t: (t / "meta.json").is_file()) as d:
            meta = write(d)
        return map_arrow(prepared / key / "features.arrow"), meta
    with tempfile.TemporaryDirectory(prefix="tunelab-prepared-") as d:
        meta = write(Path(d))
        return map_arrow(Path(d) / "features.arrow"), meta


def schema(classification: bool):
    import pyarrow as pa

    tokens = pa.list_(pa.int32())
    fields = [("input_ids", tokens), ("labels", tokens), ("length", pa.int32()), ("prompt", pa.large_string()),
              ("special", pa.bool_()), ("reference", pa.large_string())]  # fmt: skip
    if classification:
        fields.append(("class", pa.int32()))
    return pa.schema(fields)
