"""Reading a data file once, into Arrow on disk: the rows of a JSONL, JSON or CSV file become a table of their
JSON text and the line each starts on, memory-mapped, and kept in ``TUNELAB_HOME/data/rows/`` under a digest
of the file's bytes, so the next run on the same file opens it in milliseconds. A Parquet file is already
columnar: it is read in record batches from a memory map, never whole.

Text reaches training exactly as written: JSON and CSV go through the standard library (CSV cells stay
strings), not through loaders that infer types (which turn "2021-03-04" into a date, "007" into 7 and "NA"
into a missing value). A row is parsed again where it is rendered (:mod:`tunelab.dataprep`), so its errors
name the file and line there too.

Memory stays flat whatever the file's size: the file is read line by line and written in batches of
:data:`BATCH` rows; only a row's own text is ever held whole.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LOADERS = (".jsonl", ".json", ".csv", ".parquet")
BATCH = 8192  #: rows per Arrow record batch written
BAR_MIN_BYTES = 4 << 20  #: files smaller than this are read without a progress bar (it would only flash)
READER_VERSION = 1  #: bumped when what a file reads to changes, so older tables are not reused


class DataError(ValueError):
    pass


def cache_dir(kind: str) -> Path | None:
    """``TUNELAB_HOME/data/<kind>``, created; None where the home cannot be written (read-only, or not a
    directory): what would be kept there is then written to a temporary directory and not kept."""
    from tunelab.models import tunelab_home

    d = tunelab_home() / "data" / kind
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return d if os.access(d, os.W_OK) else None


@contextlib.contextmanager
def locked(name: str | None) -> Iterator[None]:
    """Hold ``TUNELAB_HOME/data/locks/<name>`` while a cache entry is written, so that processes preparing
    the same entry at once (the ranks of a distributed run, two comparisons) prepare it once: the others
    wait, then map what the first wrote. No lock where the home cannot be written."""
    locks = cache_dir("locks") if name is not None else None
    if locks is None:
        yield
        return
    import fcntl

    with (locks / name).open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def mapped(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """``row`` with ``data.columns`` applied: each of tunelab's names takes the value of the user's column."""
    return {**row, **{ours: row.get(theirs) for ours, theirs in columns.items()}} if columns else row


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _not_utf8(path: Path, line_no: int, byte: int, column: int) -> DataError:
    return DataError(
        f"{path}:{line_no}: not UTF-8 text (byte 0x{byte:02x} at column {column}); save the file as UTF-8"
    )


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text with its line ending) for every line; a UTF-8 byte-order mark is dropped. Lines end
    at ``\\n`` only (not ``splitlines()``: JSON strings may hold U+2028)."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, n, raw[e.start], e.start + 1) from None


def parse_row(path: str | Path, line: int | None, text: str) -> dict[str, Any]:
    """One row's JSON text as a dict, or :class:`DataError` naming the file and line (or row)."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    return obj


def parsed(name: str, line: int | None, payload: str | dict) -> dict[str, Any]:
    """A payload of :meth:`Source.chunks` as a dict: a row read in place, or JSON text parsed (a bad row
    raises :class:`DataError` naming the file and line)."""
    return payload if isinstance(payload, dict) else parse_row(name, line, payload)


def line_blocks(f, size: int, seen: Callable[[bytes], Any] | None = None) -> Iterator[bytes]:
    """The bytes of the open binary file ``f`` in blocks of about ``size`` that end at a line's end (the last
    block may not); ``seen`` gets each read as it is read (a digest, a progress bar)."""
    rest = b""
    while True:
        piece = f.read(size)
        if seen is not None:
            seen(piece)
        data = rest + piece
        if not data:
            return
        cut = data.rfind(b"\n") + 1 if piece else len(data)
        if not cut:  # no line ends in this block yet (a very long line)
            rest = data
            continue
        yield data[:cut]
        rest = data[cut:]
        if not piece:
            return


def _json_lines(path: Path) -> Iterator[tuple[list[int], list[str]]]:
    """The non-blank lines of a JSON Lines file, a block of the file at a time: (line numbers, lines). A
    block is decoded at once; one that is not UTF-8 is gone through line by line to name the line."""
    done = 0  # lines before this block
    with path.open("rb") as f:
        for data in line_blocks(f, 1 << 24):
            yield json_lines(path, data, done + 1)
            done += data.count(b"\n") + (not data.endswith(b"\n"))


def json_lines(path: Path, data: bytes, line: int, blank: str | None = None) -> tuple[list[int], list[str]]:
    """The non-blank lines of whole lines of a JSON Lines file, ``data``, whose first is line ``line``: (line
    numbers, texts). Decoded at once; bytes that are not UTF-8 are gone through line by line to name the
    line. ``blank``: the characters a blank line holds (default: any whitespace)."""
    bom = "utf-8-sig" if line == 1 else "utf-8"
    try:
        text = data.decode(bom)
    except UnicodeDecodeError:
        for n, raw in enumerate(data.split(b"\n"), line):
            try:
                raw.decode(bom if n == line else "utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, n, raw[e.start], e.start + 1) from None
        raise
    lines = text.split("\n")  # not splitlines(): JSON strings may hold U+2028
    if text.endswith("\n"):
        lines.pop()
    keep = [i for i, x in enumerate(lines) if x.strip(blank)]
    return [line + i for i in keep], [lines[i] for i in keep]


def _json_array(path: Path) -> Iterator[tuple[int | None, str]] | None:
    """A ``.json`` file holding one list of objects: its rows (no line numbers); None when it is JSON Lines."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _not_utf8(path, line, data[e.start], e.start - data.rfind(b"\n", 0, e.start)) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines in a .json file
            return None
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"{path}: a .json file must hold a list of objects (one per row), or one object per line")
    return ((None, json.dumps(r, ensure_ascii=False)) for r in obj)


def _csv_rows(path: Path) -> Iterator[tuple[int, str]]:
    """Every cell as the string in the file: no type guessing, "NA" stays "NA", "007" stays "007"."""
    reader = csv.DictReader((text for _, text in _lines(path)))
    last = 1  # line 1 is the header
    try:
        for row in reader:
            clean = {k: v for k, v in row.items() if k is not None}  # cells past the header are dropped
            yield last + 1, json.dumps(clean, ensure_ascii=False)
            last = reader.line_num
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _rows_of(path: Path) -> Iterator[tuple[list[int | None], list[str]]]:
    """The rows of a file, in blocks: (line numbers or None, each row's JSON text)."""
    suffix = path.suffix.lower()
    rows = _csv_rows(path) if suffix == ".csv" else _json_array(path) if suffix == ".json" else None
    if rows is None:
        yield from _json_lines(path)
        return
    block: tuple[list, list] = ([], [])
    for line, text in rows:
        block[0].append(line)
        block[1].append(text)
        if len(block[1]) == BATCH:
            yield block
            block = ([], [])
    yield block


@dataclass
class Source:
    """The rows of one file (or of a list in memory): how many, the line each starts on, and their content
    by index, in batches. ``digest`` fingerprints what the rows are (None: not cached downstream)."""

    name: str
    n: int
    digest: str | None
    table: Any = None  #: pyarrow Table: ``row`` (JSON text), ``line`` (null without line numbers)
    parquet: Path | None = None
    rows: list[dict] | None = None  #: rows given in memory
    row_lines: list[int] | None = None

    def chunks(self, idx: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, list, list]]:
        """For the rows ``idx`` (ascending), in chunks of about ``size``: (indices, their lines, their
        payloads), a payload being a row's JSON text or, for Parquet and rows in memory, the row itself.
        Rows are taken from one record batch at a time (a take over the whole table would first join all
        its batches: a copy of the file in memory)."""
        if self.rows is not None:
            for start in range(0, len(idx), size):
                part = idx[start : start + size]
                yield (
                    part,
                    [self.row_lines[i] if self.row_lines else None for i in part],
                    [self.rows[i] for i in part],
                )
            return
        offset, held_idx, held_lines, held = 0, [], [], []
        for batch in self._batches():
            lo, hi = np.searchsorted(idx, [offset, offset + batch.num_rows])
            if hi > lo:
                lines, payloads = self._payloads(batch.take(idx[lo:hi] - offset))
                held_idx.append(idx[lo:hi])
                held_lines += lines
                held += payloads
                while len(held) >= size:
                    joined = np.concatenate(held_idx)
                    yield joined[:size], held_lines[:size], held[:size]
                    held_idx, held_lines, held = [joined[size:]], held_lines[size:], held[size:]
            offset += batch.num_rows
            if hi == len(idx):
                break
        if held:
            yield np.concatenate(held_idx), held_lines, held

    def _batches(self) -> Iterator[Any]:
        """The file's rows in record batches of the size they were written in (:data:`BATCH`)."""
        if self.parquet is not None:
            import pyarrow.parquet as pq

            yield from pq.ParquetFile(self.parquet, memory_map=True).iter_batches(batch_size=BATCH)
        else:
            yield from self.table.to_batches()

    def _payloads(self, batch) -> tuple[list, list]:
        if self.parquet is not None:
            return [None] * batch.num_rows, batch.to_pylist()
        return batch.column("line").to_pylist(), batch.column("row").to_pylist()

    def parsed(self, line: int | None, payload: str | dict) -> dict[str, Any]:
        return parsed(self.name, line, payload)

    def row(self, i: int) -> dict[str, Any]:
        """Row ``i`` as a dict."""
        _, lines, payloads = next(self.chunks(np.array([i]), 1))
        return self.parsed(lines[0], payloads[0])

    def all_rows(self) -> tuple[list[dict[str, Any]], list[int] | None]:
        rows, lines = [], []
        for _, ls, payloads in self.chunks(np.arange(self.n), BATCH):
            rows += [self.parsed(ln, p) for ln, p in zip(ls, payloads, strict=True)]
            lines += ls
        return rows, (lines if lines and lines[0] is not None else None)


def in_memory(rows: list[dict], lines: list[int] | None, name: str) -> Source:
    return Source(name, len(rows), None, rows=rows, row_lines=lines)


def open_source(path: str | Path) -> Source:
    """A data file as a :class:`Source`: a Parquet file in place; any other read once into
    ``TUNELAB_HOME/data/rows/<digest>.arrow`` (a progress bar shows rows/s) and memory-mapped from there."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path.resolve()}")
    suffix = path.suffix.lower()
    if suffix not in LOADERS:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(LOADERS)}")
    digest = file_digest(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            n = pq.ParquetFile(path, memory_map=True).metadata.num_rows
        except Exception as e:  # pyarrow raises several types for a file that is not Parquet
            from tunelab.errors import first_line

            raise DataError(f"{path}: could not be read as parquet: {first_line(e)}") from None
        return Source(str(path), n, f"parquet-{digest}", parquet=path)
    name = f"{digest}-v{READER_VERSION}.arrow"
    rows = cache_dir("rows")
    if rows is None:
        with tempfile.TemporaryDirectory(prefix="tunelab-rows-") as d:
            _write_rows(path, Path(d) / name)
            table = map_arrow(Path(d) / name)  # the map keeps the file readable once it is unlinked
    else:
        with locked(f"rows-{digest}"):
            if not (rows / name).is_file():
                _write_rows(path, rows / name)
        table = map_arrow(rows / name)
    return Source(str(path), table.num_rows, f"rows-{digest}-v{READER_VERSION}", table=table)


def map_arrow(path: Path):
    """An Arrow stream file as a table whose buffers point into a memory map of it: nothing is copied."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as m:
        return pa.ipc.open_stream(m).read_all()


def _write_rows(path: Path, target: Path) -> None:
    """The file's rows as an Arrow stream at ``target``, written beside it and renamed when complete (so
    no reader sees half a file)."""
    import pyarrow as pa

    from tunelab.progress import Bar

    schema = pa.schema([("row", pa.large_string()), ("line", pa.int64())])
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    bar = Bar(f"reading {path.name}", None if path.stat().st_size >= BAR_MIN_BYTES else 0, "rows")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
            for lines, texts in _rows_of(path):
                for start in range(0, len(texts), BATCH):
                    cols = [pa.array(texts[start : start + BATCH], pa.large_string()),
                            pa.array(lines[start : start + BATCH], pa.int64())]  # fmt: skip
                    w.write_batch(pa.record_batch(cols, schema=schema))
                bar.update(len(texts))
        os.replace(tmp, target)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
