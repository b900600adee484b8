"""Training from a file without preparing it first (``data.streaming``): for files bigger than memory, or
too big to prepare before step 1.

The file is read in place: one pass at the start indexes it (every :data:`BLOCK` rows, the byte offset and
line where the block starts; Parquet files are indexed by their row groups) and fingerprints its bytes,
without holding or copying it. Training then reads the blocks in an order drawn for each epoch, prepares
each block as it comes (the same :func:`tunelab.dataprep.run_chunk` as the prepared path: same rendering,
masks and ``file:line`` errors), and sends the rows through

1. a **shuffle buffer** of ``data.shuffle_buffer`` rows (each incoming row replaces a random one, which is
   emitted; the buffer is emptied, shuffled, at the end of each epoch, so every row trains once per epoch);
2. **length grouping** inside windows of :data:`WINDOW` global batches (transformers' megabatches: sorted
   longest first, so batches hold rows of similar lengths and the first batch is a long one).

Every draw comes from a generator seeded with ``(training.seed, epoch)``, so the stream is a function of
the file and the config alone. The Trainer resumes an iterable dataset by reading it again from the start
and dropping the batches already trained: the rows, their order and so the weights are bit-identical to the
uninterrupted run's. The price is that a resume prepares again every row before its checkpoint (in one
process, about 6,000 rows/s).

The eval and dev splits are carved by row position exactly as the prepared path carves them and prepared
as usual (they are small); training skips their positions. ``training.max_tokens`` sets the schedule's
horizon from the mean length of the first :data:`ESTIMATE_ROWS` training rows (the budget itself is
counted exactly, as always). Multi-task and continual modes, strategies that change the training rows
(replay) and multi-process runs do not stream: the config says so.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.dataprep import run_chunk
from tunelab.sources import BAR_MIN_BYTES, DataError, Source, _not_utf8, json_lines, line_blocks

BLOCK = 1024  #: rows per block: what is read and prepared at once, and what the epoch's order shuffles
WINDOW = 50  #: global batches per length-sorted window (transformers' megabatch)
ESTIMATE_ROWS = 4096  #: rows whose mean length sets max_tokens' horizon
PIECE = 1 << 22  #: bytes indexed at once
STREAMABLE = (".jsonl", ".csv", ".parquet")
_BLANK = np.zeros(256, dtype=bool)
_BLANK[[9, 10, 13, 32]] = True  # JSON's whitespace: a line of only these is blank


def wants_streaming(data_cfg) -> tuple[bool, str]:
    """Whether ``data.streaming`` streams this run's training file, and why (said when auto decides)."""
    choice = getattr(data_cfg, "streaming", False)
    if choice is not True and choice != "auto":
        return False, ""
    path = Path(data_cfg.train)
    if choice is True:
        return True, "data.streaming: true"
    size = path.stat().st_size if path.is_file() else 0
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2  # half the machine's memory
    if size <= limit or path.suffix.lower() not in STREAMABLE:
        return False, ""
    return True, f"data.streaming: auto: {path.name} ({size / 2**30:.1f} GiB) is over half this machine's memory"


def stream_batch(cfg, stack, processes: int) -> int | None:
    """For a single-mode run of ``processes`` processes: the global batch (rows per optimizer step) when its
    training file streams, else None; a line says why auto streams, or why a stream asked for cannot be."""
    from tunelab.progress import is_main_process, status

    streams, why = wants_streaming(cfg.data)
    if not streams or stack.baseline:  # a baseline trains nothing: only its shots are read
        return None
    given = cfg.data.streaming is True
    blocked = (
        f"{', '.join(stack.changes_rows)} changes the training rows before training, which needs them all at hand"
        if stack.changes_rows
        else f"this run has {processes} processes; streaming runs in one"
        if processes > 1
        else None
    )
    if blocked and given:
        raise DataError(f"data.streaming: true: {blocked}; set data.streaming: false")
    if blocked:
        if is_main_process():
            status(f"{why}, but not streamed: {blocked}; preparing it whole")
        return None
    if not given:
        status(f"{why}: streaming it")
    t = cfg.training
    return t.batch_size * t.grad_accum


# ----------------------------------------------------------------------------- indexing a file in place


@dataclass
class StreamSource(Source):
    """A file read in place, a block at a time: ``starts[b]`` is the byte offset of block ``b``'s first row
    (or its row group), ``lines[b]`` that row's line, ``sizes[b]`` its rows."""

    path: Path | None = None
    kind: str = ""
    starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lines: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    header: list[str] | None = None  #: a CSV file's column names

    @functools.cached_property
    def first_rows(self) -> np.ndarray:  # read for every block: computed once, not per block
        return np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    def pieces(self, b: int) -> Iterator[tuple[int, list, list]]:
        """Block ``b``'s rows, a piece of at most :data:`BLOCK` at a time: (the first row's position, their lines,
        their payloads: JSON text, or the row itself for Parquet). A Parquet block is a row group, read a
        record batch at a time from a memory map."""
        first = int(self.first_rows[b])
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(self.path, memory_map=True).iter_batches(BLOCK, row_groups=[int(b)]):
                yield first, [None] * batch.num_rows, batch.to_pylist()
                first += batch.num_rows
            return
        end = int(self.starts[b + 1]) if b + 1 < len(self.starts) else None
        with self.path.open("rb") as f:
            f.seek(int(self.starts[b]))
            data = f.read(end - int(self.starts[b])) if end is not None else f.read()
        if self.kind == "csv":
            got = list(_csv_records(self.path, io.BytesIO(data), int(self.lines[b]), self.header or []))
            got = got[: self.sizes[b]]
            yield first, [x[0] for x in got], [x[1] for x in got]
        else:
            yield first, *json_lines(self.path, data, int(self.lines[b]), blank=" \t\r\n")  # as the index

    def _batches(self) -> Iterator[Any]:  # what Source.chunks reads: the rows in file order
        if self.parquet is not None:  # Source reads Parquet in place already
            yield from super()._batches()
            return
        import pyarrow as pa

        for b in range(len(self.sizes)):
            for _, lines, payloads in self.pieces(b):
                yield pa.record_batch([pa.array(payloads, pa.large_string()), pa.array(lines, pa.int64())],
                                      names=["row", "line"])  # fmt: skip


def open_stream(path: str | Path) -> StreamSource:
    """``path`` indexed for streaming (one pass over its bytes, nothing kept but the block offsets)."""
    from tunelab.progress import Bar

    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path.resolve()}")
    suffix = path.suffix.lower()
    if suffix not in STREAMABLE:
        why = "a .json file is one array, parsed whole; write it as JSON Lines (.jsonl, one object per line)"
        raise DataError(f"{path}: data.streaming reads {', '.join(STREAMABLE)} files in place; {why}")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        from tunelab.sources import file_digest

        try:
            meta = pq.ParquetFile(path, memory_map=True).metadata
        except Exception as e:  # pyarrow raises several types for a file that is not Parquet
            raise DataError(f"{path}: could not be read as parquet: {str(e).splitlines()[0]}") from None
        sizes = np.array([meta.row_group(g).num_rows for g in range(meta.num_row_groups)], np.int64)
        zeros = np.zeros(len(sizes), np.int64)
        return StreamSource(str(path), int(sizes.sum()), f"stream-parquet-{file_digest(path)}", parquet=path,
                            path=path, kind="parquet", starts=zeros, lines=zeros, sizes=sizes)  # fmt: skip
    bar = Bar(f"indexing {path.name}", path.stat().st_size if path.stat().st_size >= BAR_MIN_BYTES else 0, "B")
    try:
        index = _index_csv if suffix == ".csv" else _index_jsonl
        digest, starts, lines, n, header = index(path, bar)
    finally:
        bar.close()
    sizes = np.diff(np.append(np.arange(0, n, BLOCK), n)).astype(np.int64)
    return StreamSource(str(path), n, f"stream-{digest}", path=path, kind=suffix[1:], starts=starts,
                        lines=lines, sizes=sizes, header=header)  # fmt: skip


def _index_jsonl(path: Path, bar) -> tuple[str, np.ndarray, np.ndarray, int, None]:
    """One pass over the bytes: the digest, and every BLOCK-th non-blank line's offset and line number."""
    h = hashlib.blake2b(digest_size=16)
    starts, lines = [], []
    n = done = pos = 0  # rows so far, lines before this piece, its byte offset

    def seen(piece: bytes) -> None:
        h.update(piece)
        bar.update(len(piece))

    with path.open("rb") as f:
        for data in line_blocks(f, PIECE, seen):
            a = np.frombuffer(data, np.uint8)
            ends = np.flatnonzero(a == 10) + 1
            if not len(ends) or ends[-1] != len(a):
                ends = np.append(ends, len(a))
            begins = np.concatenate([[0], ends[:-1]])
            rows = np.flatnonzero(np.logical_or.reduceat(~_BLANK[a], begins))  # lines with a non-blank byte
            first = (-n) % BLOCK  # the first row of this piece that starts a block
            starts += (pos + begins[rows[first::BLOCK]]).tolist()
            lines += (done + 1 + rows[first::BLOCK]).tolist()
            n, done, pos = n + len(rows), done + len(ends), pos + len(data)
    return h.hexdigest(), np.array(starts, np.int64), np.array(lines, np.int64), n, None


def _csv_records(path: Path, raw_lines, line: int, header: list[str]) -> Iterator[tuple[int, str, int]]:
    """The records of CSV lines (bytes) that start on line ``line``: each record's line, its cells as JSON text
    (strings, as written), and the number of bytes read through it."""
    pos, line_no = [0], [line - 1]

    def text_lines() -> Iterator[str]:
        for raw in raw_lines:
            pos[0] += len(raw)
            line_no[0] += 1
            try:
                yield raw.decode("utf-8-sig" if line_no[0] == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, line_no[0], raw[e.start], e.start + 1) from None

    reader = csv.DictReader(text_lines(), fieldnames=header)
    try:
        while True:
            start = line_no[0] + 1
            row = next(reader, None)
            if row is None:
                return
            clean = {k: v for k, v in row.items() if k is not None}  # cells past the header are dropped
            yield start, json.dumps(clean, ensure_ascii=False), pos[0]
    except csv.Error as e:
        raise DataError(f"{path}:{line_no[0]}: not valid CSV ({e})") from None


def _index_csv(path: Path, bar) -> tuple[str, np.ndarray, np.ndarray, int, list[str]]:
    """One pass over the bytes: the digest, every BLOCK-th record's offset and line (records may span lines:
    quoted newlines), and the header."""
    h = hashlib.blake2b(digest_size=16)
    starts, lines, n = [], [], 0

    def digested(f) -> Iterator[bytes]:
        for raw in f:
            h.update(raw)
            yield raw

    with path.open("rb") as f:
        head = f.readline()
        h.update(head)
        try:
            header = next(csv.reader([head.decode("utf-8-sig")]), [])
        except UnicodeDecodeError as e:
            raise _not_utf8(path, 1, head[e.start], e.start + 1) from None
        previous_end = offset = len(head)
        for start, _, end in _csv_records(path, digested(f), 2, header):  # the csv module finds record ends
            if n % BLOCK == 0:
                starts.append(previous_end)
                lines.append(start)
            bar.update(offset + end - previous_end)
            previous_end = offset + end
            n += 1
    return h.hexdigest(), np.array(starts, np.int64), np.array(lines, np.int64), n, header


# ----------------------------------------------------------------------------- the training stream


class StreamingRows(torch.utils.data.IterableDataset):
    """The training rows of ``src`` (every position but ``excluded``, the carved eval and dev rows), prepared
    a block at a time by ``job``, shuffled through a buffer and length-grouped in windows, epoch after epoch
    without end (the Trainer stops at its step horizon). ``stats`` counts what the first pass over the file
    used and skipped."""

    streaming = True

    def __init__(self, src: StreamSource, excluded: np.ndarray, job, seed: int, buffer: int, batch: int, stats):
        super().__init__()
        self.src, self.excluded, self.job = src, np.asarray(excluded, np.int64), job
        self.seed, self.buffer, self.window = seed, buffer, max(1, WINDOW * batch)
        self.n = src.n - len(self.excluded)  # the training rows: an epoch (no __len__: the stream never ends)
        self.stats = stats  #: DataStats: what the first epoch read, used and skipped
        self.counted = np.zeros(len(src.sizes), dtype=bool)

    # -- one block, prepared
    def rows(self, b: int, first_epoch: bool = False) -> Iterator[dict[str, Any]]:
        """Block ``b``'s training rows, prepared a piece at a time; in the first epoch, counted once."""
        count = first_epoch and not self.counted[b]  # each block once, however often the stream is read
        seen = 0
        for lo, lines, payloads in self.src.pieces(b):
            seen += len(payloads)
            positions = np.arange(lo, lo + len(payloads))
            if not len(positions):
                continue
            cut = self.excluded[
                np.searchsorted(self.excluded, lo) : np.searchsorted(self.excluded, lo + len(positions))
            ]
            take = np.flatnonzero(np.isin(positions, cut, invert=True))
            if not len(take):
                continue
            batch, skipped, error = run_chunk(
                self.job, positions[take], [lines[i] for i in take], [payloads[i] for i in take]
            )
            if error is not None:
                raise DataError(error)
            if count:
                self.stats.read += len(take)
                self.stats.skipped += len(skipped)
                self.stats.reasons += skipped[: max(0, 10 - len(self.stats.reasons))]
                self.stats.used += batch.num_rows if batch is not None else 0
            if batch is not None:
                yield from _dicts(batch)
        if seen != self.src.sizes[b]:
            raise DataError(f"{self.src.name}: changed while training (block {b} of its index no longer matches)")
        if count:
            self.counted[b] = True

    def head(self, k: int) -> list[dict[str, Any]]:
        """The first ``k`` training rows in file order (an estimate's sample)."""
        out: list[dict] = []
        for b in range(len(self.src.sizes)):
            for row in self.rows(b):
                out.append(row)
                if len(out) == k:
                    return out
        return out

    # -- the stream
    def _shuffled(self) -> Iterator[dict[str, Any]]:
        epoch = 0
        while True:
            rng = np.random.default_rng([self.seed, epoch])
            held: list[dict] = []
            any_row = False
            for b in rng.permutation(len(self.src.sizes)):
                for row in self.rows(int(b), first_epoch=epoch == 0):
                    any_row = True
                    if len(held) < self.buffer:
                        held.append(row)
                        continue
                    j = int(rng.integers(self.buffer))
                    yield held[j]
                    held[j] = row
            if not any_row:
                raise DataError(
                    f"{self.src.name}: every row was skipped; first: {(self.stats.reasons or ['?'])[0]}"
                )
            for j in rng.permutation(len(held)):
                yield held[j]
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = self._shuffled()
        while True:
            window = [next(stream) for _ in range(self.window)]
            window.sort(key=lambda r: -r["length"])  # stable: equal lengths keep the drawn order
            yield from window


def _dicts(batch) -> list[dict[str, Any]]:
    """A prepared record batch's rows as the dicts the collator reads (numpy views of the batch's buffers)."""
    out = []
    ids, labels = batch.column("input_ids"), batch.column("labels")
    offsets = ids.offsets.to_numpy()
    # copied once per block: the collator's tensors may then share them (Arrow's buffers are read-only)
    id_values, label_values = np.array(ids.values), np.array(labels.values)
    lengths = batch.column("length").to_numpy()
    classes = batch.column("class").to_numpy() if "class" in batch.schema.names else None
    for i in range(batch.num_rows):
        lo, hi = offsets[i], offsets[i + 1]
        row = {"input_ids": id_values[lo:hi], "labels": label_values[lo:hi], "length": int(lengths[i])}
        if classes is not None:
            row["class"] = int(classes[i])
        out.append(row)
    return out
