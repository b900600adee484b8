"""Training data: the four row shapes, rendered a batch at a time, with exact loss masks; the splits.

Files are read by :mod:`tunelab.sources` and prepared (in workers, cached under ``TUNELAB_HOME/data``) by
:mod:`tunelab.dataprep`, which calls :class:`Formatter` here for each chunk of rows.

Shapes (``data.format``; ``auto`` picks by columns):

- ``text``: language modelling; every token carries loss (an end-of-sequence token is appended).
- ``prompt_completion``: loss on the completion only.
- ``messages``: a chat, ``[{role, content}, ...]``, rendered with the tokenizer's chat template; loss on
  the assistant turns only (their content and the template's end-of-turn token).
- ``classification``: ``text`` + ``label``, trained as generating the label after an instruction that
  lists the label set; scored by accuracy.

Masks are computed on characters, then mapped to tokens through the fast tokenizer's offsets: each
assistant span is found by rendering the chat up to the turn (with the generation prompt) and through
the turn, so any prefix-stable chat template works without knowing its markup.

Rows that are malformed, miss fields, or keep no trainable token after truncation raise
:class:`DataError` naming file, row and line, or with ``skip_bad_rows`` are skipped and counted.

Long because the four shapes' rendering, the batched chat template and tokenizer calls, the masks and the
splits (carving, shots) are one path whose errors must name the same file and line, and whose every
rendering decision must be in the cache key beside it; each part is a short function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab import dataprep
from tunelab.dataprep import IGNORE, Column, Prompts, Rows  # noqa: F401 - IGNORE and the views, re-exported
from tunelab.sources import LOADERS, DataError, Source, in_memory, locked, mapped, open_source  # noqa: F401 - re-exported

#: What a row may carry beside its tokens, for the engine and strategies, never for the model's forward:
#: its task's index (multi-task runs) and its class's index in the label set (classification rows; -1 none).
ANNOTATIONS = ("task", "class")


@dataclass
class DataStats:
    rows: int = 0
    used: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)  # the first few, for the summary
    read: int | None = None  #: a streamed split: the rows its first epoch read (used + skipped count those)

    def as_dict(self) -> dict[str, Any]:
        out = {"rows": self.rows, "used": self.used, "skipped": self.skipped, "skip_reasons": self.reasons[:10]}
        return out if self.read is None else {**out, "streamed": True, "read": self.read}


# ----------------------------------------------------------------------------- reading files


def read_rows_with_lines(path: str | Path) -> tuple[list[dict[str, Any]], list[int] | None]:
    """Rows of a local JSONL/JSON/CSV/Parquet file, and the line each row starts on (None for Parquet and
    JSON arrays), as Python objects: for small files (a retention set, a task list). Training data goes
    through :func:`prepare_splits`, which never holds a file's rows in Python. Text reaches training exactly
    as written (:mod:`tunelab.sources`)."""
    return open_source(path).all_rows()


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    return read_rows_with_lines(path)[0]


# ----------------------------------------------------------------------------- row shapes


def detect_format(columns: set[str]) -> str:
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if {"text", "label"} <= columns:
        return "classification"
    if "text" in columns:
        return "text"
    raise DataError(
        f"cannot tell the data format from columns {sorted(columns)}: expected `messages`, `prompt`+`completion`, "
        "`text`+`label` or `text` (rename yours with data.columns)"
    )


@dataclass
class Rendered:
    """One row rendered as text, with the character spans that carry loss and, when scorable, the reference."""

    text: str
    spans: list[tuple[int, int]]
    prompt: str | None = None  # what generation starts from when scoring
    reference: str | None = None
    special: bool = True  # add the tokenizer's own special tokens (BOS); chat templates write theirs


class Formatter:
    """Renders rows of one shape with one tokenizer. Raises ``ValueError`` with a plain reason for a bad row."""

    def __init__(self, tokenizer, data_cfg, fmt: str, labels: list[str] | None = None, shots=()):
        self.tok = tokenizer
        self.cfg = data_cfg
        self.fmt = fmt
        self.labels = labels
        self.shots: list[tuple[str, str]] = list(shots)  # few-shot: solved (prompt, answer) pairs shown first
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if data_cfg.template == "chat" and not has_template:
            raise DataError("data.template is 'chat' but the tokenizer has no chat template; use 'plain'")
        if fmt == "messages" and not has_template:
            raise DataError("`messages` rows need a tokenizer with a chat template; this tokenizer has none")
        self.chat = data_cfg.template == "chat" or (data_cfg.template == "auto" and has_template)
        self.eos = tokenizer.eos_token or ""
        # No token covers more input characters than its vocabulary string has (byte-level pieces are one
        # character per byte), so (max_length + margin) * this many characters hold every token that can
        # survive truncation: a 50 MB row costs no more than one of that length. This holds for tokenizers
        # that keep every character (byte-level BPE, SentencePiece: every causal LM here); one that drops
        # characters (WordPiece drops whitespace) may see fewer tokens on rows longer than the bound.
        self.max_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=16)
        self._direct: dict[bool, bool] = {}  # per add_generation_prompt: the direct render is checked equal

    # -- helpers --------------------------------------------------------------------------------
    def _template(self, conversations: list[list[dict]], generation_prompt: bool) -> list[str]:
        """The chat template applied to each conversation. transformers' ``apply_chat_template`` spends half
        its time normalising messages that here are already plain ``{role, content}`` strings, so the
        compiled template it uses is rendered directly, with the same variables, once the first
        conversation has rendered the same both ways (else, and without that compiled template, through
        ``apply_chat_template`` for every one)."""
        slow = self.tok.apply_chat_template
        direct = self._direct.get(generation_prompt)
        if direct is None:
            first = slow(conversations[:1], tokenize=False, add_generation_prompt=generation_prompt)
            direct = self._direct[generation_prompt] = self._render(conversations[:1], generation_prompt) == first
        if direct:
            return self._render(conversations, generation_prompt)
        return slow(conversations, tokenize=False, add_generation_prompt=generation_prompt)

    def _render(self, conversations: list[list[dict]], generation_prompt: bool) -> list[str] | None:
        if getattr(self, "_jinja", None) is None:
            try:
                from transformers.utils.chat_template_utils import _compile_jinja_template

                self._jinja = _compile_jinja_template(self.tok.get_chat_template())
            except Exception:  # noqa: BLE001 - another transformers: apply_chat_template does it all
                return None
        kw = {**self.tok.special_tokens_map, "tools": None, "documents": None}
        return [
            self._jinja.render(messages=c, add_generation_prompt=generation_prompt, **kw) for c in conversations
        ]

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.cfg.system_prompt and (not messages or messages[0].get("role") != "system"):
            return [{"role": "system", "content": self.cfg.system_prompt}, *messages]
        return messages

    def _chat_pair(self, prompt: str, completion: str) -> Rendered | _Chat:
        if self.chat:
            shown = [{"role": r, "content": c} for p, a in self.shots for r, c in (("user", p), ("assistant", a))]
            msgs = [*shown, {"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return _Chat(self._with_system(msgs), own_only=True)  # the shown answers carry no loss
        prompt = "".join(f"{p}{a}\n\n" for p, a in self.shots) + prompt
        text = prompt + completion + self.eos
        return Rendered(text, [(len(prompt), len(text))], prompt, completion)

    def _finish(self, chats: list[_Chat]) -> list[Rendered | Exception]:
        """Render chats with the chat template, every conversation of the batch in one call per kind (with and
        without the generation prompt); a batch the template refuses is rendered chat by chat, so the error
        is the row's own."""
        wanted: dict[bool, dict[tuple[int, int], None]] = {False: {}, True: {}}  # ordered sets
        for c, chat in enumerate(chats):
            for n, gen in chat.needs():
                wanted[gen][(c, n)] = None
        texts: dict[tuple[int, int, bool], str] = {}
        try:
            for gen, keys in wanted.items():
                if keys:
                    convs = [chats[c].msgs[:n] for c, n in keys]
                    for (c, n), text in zip(keys, self._template(convs, gen), strict=True):
                        texts[(c, n, gen)] = text
        except Exception as e:  # noqa: BLE001 - a template's own errors have many types; found row by row below
            if len(chats) > 1:
                return [out for chat in chats for out in self._finish([chat])]
            from tunelab.errors import first_line

            return [ValueError(f"the chat template refused this row: {first_line(e)}")]
        return [chat.rendered(lambda n, gen, c=c: texts[(c, n, gen)]) for c, chat in enumerate(chats)]

    def pair(self, row: dict[str, Any]) -> tuple[str, str]:
        """A row as a solved example (prompt, answer), for few-shot prompts."""
        if self.fmt == "prompt_completion":
            return _need_str(row, "prompt"), _need_text(row, "completion")
        if self.fmt == "classification":
            label = str(row.get("label"))
            return self.cfg.instruction.format(
                text=_need_str(row, "text"), labels=", ".join(self.labels or [])
            ), label
        raise DataError(f"few-shot examples need prompt/completion or classification rows, not {self.fmt} rows")

    # -- rows ---------------------------------------------------------------------------------
    def render_many(self, rows: list[dict[str, Any]], shots_for=None) -> list[Rendered | Exception]:
        """Each row rendered, or the reason it cannot be (a ``ValueError``; a :class:`DataError` is about the
        whole data, not the row). ``shots_for``: a function of a row's prompt giving its own shown examples."""
        plans: list[Rendered | _Chat | Exception] = []
        for row in rows:
            try:
                if shots_for is not None:
                    self.shots = shots_for(self.pair(row)[0])
                plans.append(self._plan(row))
            except (ValueError, KeyError, TypeError) as e:
                plans.append(e)
        chats = [p for p in plans if isinstance(p, _Chat)]
        done = iter(self._finish(chats) if chats else [])
        return [next(done) if isinstance(p, _Chat) else p for p in plans]

    def _plan(self, row: dict[str, Any]) -> Rendered | _Chat:
        if self.fmt == "text":
            text = _need_text(row, "text")
            return Rendered(text + self.eos, [(0, len(text) + len(self.eos))])
        if self.fmt == "prompt_completion":
            return self._chat_pair(_need_str(row, "prompt"), _need_text(row, "completion"))
        if self.fmt == "classification":
            text, label = _need_str(row, "text"), row.get("label")
            if label is None or (isinstance(label, str) and not label.strip()):
                raise ValueError("missing field 'label'")
            label = str(label)
            if self.labels is not None and label not in self.labels:
                raise ValueError(f"label {label!r} is not among the training labels {self.labels}")
            prompt = self.cfg.instruction.format(text=text, labels=", ".join(self.labels or [label]))
            return self._chat_pair(prompt, label)
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of {role, content}")
        clean = []
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{j}] must be an object with a string 'content'")
            if m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"messages[{j}].role is {m.get('role')!r}; allowed: system, user, assistant")
            if m["role"] == "assistant" and not m["content"].strip():
                raise ValueError(f"messages[{j}] is an empty assistant message: nothing to learn")
            clean.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in clean):
            raise ValueError("no assistant message: nothing to learn")
        return _Chat(self._with_system(clean))

    # -- tokens ---------------------------------------------------------------------------------
    def tokenize_many(self, rs: list[Rendered], max_length: int, train_on: str) -> Tokens:
        """The rendered rows' tokens and labels, cut to ``max_length``, as flat arrays (the tokenizer called
        once per batch, the loss masks computed for the whole batch at once), and why a row has nothing
        to train on. A row is cut to the characters its first ``max_length`` tokens can come from before
        tokenizing (see ``max_token_chars``)."""
        limit = (max_length + 16) * self.max_token_chars
        n = len(rs)
        pairs: list = [None] * n
        for special in (True, False):
            group = [i for i, r in enumerate(rs) if r.special == special]
            if group:
                encoded = self._encode([rs[i].text[:limit] for i in group], special)
                for i, pair in zip(group, encoded, strict=True):
                    pairs[i] = pair
        lens = np.fromiter((len(p[0]) for p in pairs), dtype=np.int64, count=n)
        total = int(lens.sum())
        ids = np.fromiter(chain.from_iterable(p[0] for p in pairs), dtype=np.int64, count=total)
        row = np.repeat(np.arange(n), lens)
        if train_on == "all":
            keep = np.ones(total, dtype=bool)
        else:
            # A token trains when it overlaps a loss span: one that straddles the prompt/completion boundary
            # carries completion characters, so it must be predicted too.
            at = np.fromiter(chain.from_iterable(chain.from_iterable(p[1] for p in pairs)), np.int64, 2 * total)
            at = at.reshape(-1, 2)
            spans = np.zeros((n, max((len(r.spans) for r in rs), default=0), 2), dtype=np.int64)
            for i, r in enumerate(rs):
                spans[i, : len(r.spans)] = r.spans
            keep = np.zeros(total, dtype=bool)
            for k in range(spans.shape[1]):  # an empty (0, 0) pad overlaps no token
                keep |= (at[:, 0] < spans[row, k, 1]) & (at[:, 1] > spans[row, k, 0])
        within = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens) < max_length
        trainable = np.bincount(row[within & keep], minlength=n)
        errors = [
            None
            if trainable[i]
            else ValueError(
                f"no trainable token after truncation to training.max_length={max_length} "
                f"(row is {lens[i]}{'+' if len(rs[i].text) > limit else ''} tokens)"
            )
            for i in range(n)
        ]
        labels = np.where(keep, ids, IGNORE)
        return Tokens(ids[within].astype(np.int32), labels[within].astype(np.int32), row[within],
                      np.minimum(lens, max_length), errors)  # fmt: skip

    def _encode(self, texts: list[str], special: bool) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, character offsets) of each text. The first goes through the tokenizer's own call (which also
        resets any truncation or padding left on its backend); when the backend's batch encoding gives that
        text the same ids, the whole batch is encoded by the backend (the tokenizer's call builds a dozen
        fields per row that are not used here)."""
        enc = self.tok(texts[:1], add_special_tokens=special, return_offsets_mapping=True)
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None:
            encodings = backend.encode_batch(texts, add_special_tokens=special)
            if encodings[0].ids == enc["input_ids"][0]:
                return [(e.ids, e.offsets) for e in encodings]
        enc = self.tok(texts, add_special_tokens=special, return_offsets_mapping=True)
        return list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))


@dataclass
class Tokens:
    """Tokenized rows, flat: every row's tokens one after another (``row``: whose each token is)."""

    ids: np.ndarray  #: int32
    labels: np.ndarray  #: int32, IGNORE where no loss
    row: np.ndarray  #: per token, its row
    lengths: np.ndarray  #: per row
    errors: list[ValueError | None]  #: per row: why it has nothing to train on

    def only(self, rows: list[int]) -> Tokens:
        """The rows ``rows`` (ascending) alone."""
        wanted = np.zeros(len(self.lengths), dtype=bool)
        wanted[rows] = True
        mask = wanted[self.row]
        return Tokens(self.ids[mask], self.labels[mask], self.row[mask], self.lengths[rows],
                      [self.errors[i] for i in rows])  # fmt: skip


@dataclass
class _Chat:
    """A chat to render with the template: the conversations it needs rendered (its prefixes), and how its
    text, loss spans and prompt follow from them. Each assistant span is found by rendering the chat up to
    the turn (with the generation prompt) and through the turn."""

    msgs: list[dict]
    own_only: bool = False  #: only the last assistant turn carries loss (shown examples come before it)

    def _assistants(self) -> list[int]:
        turns = [i for i, m in enumerate(self.msgs) if m["role"] == "assistant"]
        return turns[-1:] if self.own_only else turns

    def needs(self) -> list[tuple[int, bool]]:
        """(how many leading messages, with the generation prompt) for every rendering this chat needs."""
        n = len(self.msgs)
        out = [(n, False)]
        for i in self._assistants():
            out += [(i, True)] if i else []
            out.append((i + 1, False))
        if self.msgs[-1]["role"] == "assistant":
            out.append((n - 1, True))
        return out

    def rendered(self, text: Callable[[int, bool], str]) -> Rendered:
        n = len(self.msgs)
        full = text(n, False)
        spans = []
        for i in self._assistants():
            through = text(i + 1, False)
            if not full.startswith(through):
                raise DataError("the tokenizer's chat template is not prefix-stable; use data.template: plain")
            spans.append((len(text(i, True)) if i else 0, len(through)))
        prompt = reference = None
        if self.msgs[-1]["role"] == "assistant":
            prompt, reference = text(n - 1, True), self.msgs[-1]["content"]
        return Rendered(full, spans, prompt, reference, special=False)


def _need_text(row: dict, key: str) -> str:
    """A string field that carries loss: empty or whitespace-only would train only the end-of-turn token."""
    v = _need_str(row, key)
    if not v.strip():
        raise ValueError(f"field '{key}' is empty: nothing to learn")
    return v


def _need_str(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        raise ValueError(f"missing field '{key}'")
    if not isinstance(v, str):
        raise ValueError(f"field '{key}' must be a string, got {type(v).__name__}")
    return v


# ----------------------------------------------------------------------------- building datasets


@dataclass
class Prepared:
    """A tokenized split plus what scoring needs: prompts and references (None for LM-only data). Prepared
    from files, ``features`` are :class:`~tunelab.dataprep.Rows` and the two others column views, all over
    one memory-mapped Arrow table; lists of the same shapes work everywhere too (a strategy's own rows)."""

    features: Sequence[dict[str, Any]]
    prompts: Sequence[tuple[str, bool] | None]  # (prompt text, add special tokens)
    references: Sequence[str | None]
    stats: DataStats
    format: str
    labels: list[str] | None

    def dataset(self):
        return features_dataset(self.features)

    @property
    def scorable(self) -> bool:
        return any(r is not None for r in self.references)


def eval_datasets(eval_data: Prepared | dict[str, Prepared] | None):
    """The Trainer's eval dataset(s): one split, or a mapping of names to splits (each logged by name)."""
    if isinstance(eval_data, dict):
        return {name: prepared.dataset() for name, prepared in eval_data.items()}
    return eval_data.dataset() if eval_data is not None else None


def features_dataset(features: Sequence[dict[str, Any]]):
    """Tokenized rows as a ``datasets.Dataset`` (the columns the collator and length grouping read): a
    prepared split's own Arrow table, or one built from a list of rows."""
    import datasets

    if isinstance(features, Rows):
        return features.dataset()
    columns = {k: [f[k] for f in features] for k in ("input_ids", "labels", "length")}
    for k in ANNOTATIONS:
        if any(k in f for f in features):
            columns[k] = [f.get(k, -1) for f in features]
    return datasets.Dataset.from_dict(columns)


def lengths(features: Sequence[dict[str, Any]]) -> np.ndarray:
    """Every row's token count, without reading the rows' tokens where they are a prepared table."""
    if isinstance(features, Rows):
        return features.lengths
    return np.array([f["length"] for f in features], dtype=np.int64)


def prepare_rows(
    rows: list[dict],
    tokenizer,
    data_cfg,
    max_length: int,
    *,
    source: str,
    lines: list[int] | None = None,
    fmt: str | None = None,
    labels: list[str] | None = None,
    shots: list[tuple[str, str]] | Callable[[str], list[tuple[str, str]]] = (),
) -> Prepared:
    """Render and tokenize ``rows`` held in memory. ``shots``: solved (prompt, answer) pairs shown before every
    row, or a function of a row's prompt giving its own (BM25-nearest examples)."""
    return prepare_source(
        in_memory(rows, lines, source), None, tokenizer, data_cfg, max_length, fmt=fmt, labels=labels, shots=shots
    )


def prepare_source(
    src: Source,
    idx: np.ndarray | None,
    tokenizer,
    data_cfg,
    max_length: int,
    *,
    fmt: str | None = None,
    labels: list[str] | None = None,
    shots: list[tuple[str, str]] | Callable[[str], list[tuple[str, str]]] = (),
) -> Prepared:
    """Render and tokenize the rows ``idx`` (ascending; None: all) of ``src``, or map the result of an
    earlier run that prepared the same rows of the same file with the same tokenizer and options
    (:mod:`tunelab.dataprep`). A bar shows rows/s while rows are prepared and written."""
    idx = np.arange(src.n) if idx is None else idx
    fmt, labels = _shape(src, idx, data_cfg, fmt, labels)
    per_row = shots if callable(shots) else None
    shown = [] if per_row else [list(s) for s in shots]
    options = {
        "format": fmt, "labels": labels, "shots": shown, "max_length": max_length,
        "cfg": data_cfg.model_dump(mode="json", include=set(RENDERING)),
    }  # fmt: skip
    key = None if per_row else dataprep.cache_key(src, idx, tokenizer, options)
    with locked(key):
        return _prepared(src, idx, key, tokenizer, data_cfg, max_length, fmt, labels, shown, per_row)


def _shape(src: Source, idx: np.ndarray, data_cfg, fmt: str | None, labels: list[str] | None):
    """The rows' format (``data.format``, or detected from the first row) and, for classification rows, the
    label set (every label of the rows ``idx``, sorted) unless given."""
    if not len(idx):
        raise DataError(f"{src.name}: no rows")
    if fmt is None:
        fmt = (
            data_cfg.format
            if data_cfg.format != "auto"
            else detect_format(set(mapped(src.row(idx[0]), data_cfg.columns)))
        )
    if fmt == "classification" and labels is None:
        labels = sorted(
            {str(v) for v in _column(src, idx, data_cfg.columns.get("label", "label")) if v is not None}
        )
    return fmt, labels


def _job(src: Source, tokenizer, data_cfg, max_length, fmt, labels, shown, per_row=None) -> dataprep.Job:
    return dataprep.Job(
        Formatter(tokenizer, data_cfg, fmt, labels, shown),
        max_length,
        data_cfg.train_on,
        dict(data_cfg.columns),
        data_cfg.skip_bad_rows,
        src.name,
        per_row,
    )


def _prepared(src, idx, key, tokenizer, data_cfg, max_length, fmt, labels, shown, per_row) -> Prepared:
    from tunelab.progress import Bar, status

    found = dataprep.load_cached(key)
    if found is None:
        job = _job(src, tokenizer, data_cfg, max_length, fmt, labels, shown, per_row)

        def produce(write) -> dict:
            stats = DataStats(rows=len(idx))
            bar = Bar(f"preparing {Path(src.name).name}", len(idx) if len(idx) >= dataprep.CHUNK else 0, "rows")
            try:
                for size, (batch, skipped, error) in dataprep.chunk_results(job, src, idx):
                    if error is not None:
                        raise DataError(error)
                    stats.skipped += len(skipped)
                    stats.reasons += skipped[: max(0, 10 - len(stats.reasons))]
                    if batch is not None:
                        stats.used += batch.num_rows
                        write(batch)
                    bar.update(size)
            finally:
                bar.close()
            if not stats.used:
                raise DataError(
                    f"{src.name}: every row was skipped; first: {stats.reasons[0] if stats.reasons else '?'}"
                )
            return {"stats": stats.as_dict()}

        table, meta = dataprep.write_prepared(key, dataprep.schema(fmt == "classification"), produce)
    else:
        table, meta = found
        if len(idx) >= dataprep.POOL_MIN_ROWS:
            status(f"data: {src.name}: {table.num_rows:,} prepared rows read from the cache")
    st = meta["stats"]
    stats = DataStats(st["rows"], st["used"], st["skipped"], list(st["skip_reasons"]))
    return Prepared(Rows(table), Prompts(table), Column(table, "reference"), stats, fmt, labels)


#: the DataConfig fields that change what a row renders to (the others choose which rows: in the key as
#: the rows themselves)
RENDERING = ("format", "columns", "template", "system_prompt", "instruction", "train_on", "skip_bad_rows")


def _column(src: Source, idx: np.ndarray, name: str) -> Iterator[Any]:
    """One field of the rows ``idx``, for the label set of classification rows."""
    for _, lines, payloads in src.chunks(idx, dataprep.CHUNK):
        for line, p in zip(lines, payloads, strict=True):
            yield src.parsed(line, p).get(name)


def prepare_file(path, tokenizer, data_cfg, max_length, *, fmt=None, labels=None, shots=()) -> Prepared:
    return prepare_source(
        open_source(path), None, tokenizer, data_cfg, max_length, fmt=fmt, labels=labels, shots=shots
    )


@dataclass(frozen=True)
class Shots:
    """What a prompting baseline shows before each scored prompt: ``k`` solved training rows, drawn once for
    every prompt (``random``) or the ``k`` nearest to each prompt by BM25 (``bm25``, Robertson & Zaragoza
    2009, through ``bm25s``: retrieval of in-context examples, Liu et al. 2022); and the system prompt (the
    instruction) it is scored with, in place of ``data.system_prompt``."""

    k: int = 0
    select: str = "random"
    system_prompt: str | None = None


def _nearest(pool: list[tuple[str, str]], k: int):
    """For a row, the ``k`` pool pairs whose prompts are nearest to its prompt by BM25, nearest last (next
    to the row's own prompt)."""
    import bm25s

    quiet = {"show_progress": False}
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([p for p, _ in pool], stopwords="en", **quiet), **quiet)

    def pick(prompt: str) -> list[tuple[str, str]]:
        found, _ = retriever.retrieve(
            bm25s.tokenize([prompt], stopwords="en", **quiet), k=min(k, len(pool)), **quiet
        )
        return [pool[int(i)] for i in reversed(found[0])]

    return pick


DEV_AUTO = (0.1, 20, 500)  #: dev_split auto: this share of train, at least and at most these many rows


def _carve(idx: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` of the rows ``idx`` drawn with ``seed`` (in file order), and the rest."""
    order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed)).numpy()
    return idx[np.sort(order[:n])], idx[np.sort(order[n:])]


def dev_rows(data_cfg, available: int, source: str) -> int:
    """How many rows ``data.dev_split`` carves from ``available`` training rows."""
    d = data_cfg.dev_split
    if d == "auto":
        share, least, most = DEV_AUTO
        n = min(max(round(available * share), least), most)
    else:
        n = max(1, round(available * d)) if isinstance(d, float) else int(d)
    if n >= available:
        raise DataError(
            f"{source}: data.dev_split {d} takes {n} of its {available} training rows, leaving none to train on; "
            "give a smaller dev_split or a dev file (data.dev)"
        )
    return n


def prepare_splits(
    data_cfg,
    tokenizer,
    max_length: int,
    seed: int,
    shots: Shots | int = 0,
    score_on: str = "eval",
    stream: int | None = None,
) -> tuple[Prepared, Prepared | None]:
    """The training split and the split the run is scored on: the eval split (a file, a held-out fraction, or
    none), or with ``score_on="dev"`` the dev split (``data.dev``, or rows ``data.dev_split`` carves from
    train; the eval file is then never opened). Dev rows never train, whichever split is scored. Carving uses
    ``data.split_seed``, never the training seed, so every seed of a comparison sees the same splits. With
    ``shots`` (:class:`Shots`, or a number k), k training rows (drawn with ``seed``, or the nearest by BM25)
    are shown as solved examples before every prompt scored. With ``stream`` (the global batch: rows per
    optimizer step), the training split is read as it trains (:mod:`tunelab.streaming`); the splits carved
    from it are the same rows, prepared as usual."""
    from tunelab import streaming

    train_src = streaming.open_stream(data_cfg.train) if stream else open_source(data_cfg.train)
    idx = np.arange(train_src.n)
    if not len(idx):
        raise DataError(f"{train_src.name}: no rows")
    eval_idx = None
    carved = [np.zeros(0, np.int64)]  # the rows that never train
    split_seed = getattr(data_cfg, "split_seed", 0)
    if data_cfg.eval_split:
        eval_idx, idx = _carve(idx, max(1, round(len(idx) * data_cfg.eval_split)), split_seed)
        carved.append(eval_idx)
    dev = None
    if getattr(data_cfg, "dev", None):
        dev = (open_source(data_cfg.dev), None)
    elif getattr(data_cfg, "dev_split", None):
        dev_idx, idx = _carve(idx, dev_rows(data_cfg, len(idx), train_src.name), split_seed + 1)
        dev = (train_src, dev_idx)
        carved.append(dev_idx)
    if stream:
        fmt, labels = _shape(train_src, idx, data_cfg, None, None)
        job = _job(train_src, tokenizer, data_cfg, max_length, fmt, labels, [])
        stats = DataStats(rows=len(idx), read=0)
        excluded = np.sort(np.concatenate(carved))
        rows = streaming.StreamingRows(train_src, excluded, job, seed, data_cfg.shuffle_buffer, stream, stats)
        train = Prepared(rows, [], [], stats, fmt, labels)
    else:
        train = prepare_source(train_src, idx, tokenizer, data_cfg, max_length)
    shots = shots if isinstance(shots, Shots) else Shots(k=int(shots))
    examples: Any = []
    if shots.k:
        formatter = Formatter(tokenizer, data_cfg, train.format, train.labels)

        def pairs(which: np.ndarray) -> list[tuple[str, str]]:
            return [formatter.pair(mapped(train_src.row(i), data_cfg.columns)) for i in which]

        if shots.select == "bm25":
            examples = _nearest(pairs(idx), shots.k)
        else:
            drawn = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed)).tolist()[: shots.k]
            examples = pairs(idx[drawn])
    shown_cfg = data_cfg
    if shots.system_prompt is not None:
        shown_cfg = data_cfg.model_copy(update={"system_prompt": shots.system_prompt})

    def scored(src: Source, which: np.ndarray | None) -> Prepared:
        return prepare_source(
            src, which, tokenizer, shown_cfg, max_length, fmt=train.format, labels=train.labels, shots=examples
        )

    if score_on == "dev":
        if dev is None:
            raise DataError("eval.split: dev needs a dev split: give data.dev or data.dev_split")
        return train, scored(*dev)
    if data_cfg.eval:
        return train, scored(open_source(data_cfg.eval), None)
    return train, scored(train_src, eval_idx) if eval_idx is not None else None


# ----------------------------------------------------------------------------- batching


#: batches shorter than this are not bucketed: from here a grid step of 8 adds at most 7/32 of the positions.
#: Short rows (~55 tokens) are bucketed: each new length kept ~16 MB more allocated for the rest of the run
#: (half of it oneDNN's primitives for the new matmul shapes), and their lengths 53-61 came in 8 lengths
#: padded to their longest row, 2 bucketed (docs/performance.md, "Short rows bucketed too")
BUCKET_FROM = 32


def bucket_length(n: int, cap: int | None = None) -> int:
    """The length a batch whose longest row has ``n`` tokens is padded to under ``training.pad_to: bucket``:
    from :data:`BUCKET_FROM` tokens, the next multiple of 2**k / 16 for n in (2**k, 2**(k+1)], and of 8 at
    least (multiples of 8 up to 128 tokens, then 16 lengths per doubling: at most 1/16 more positions), never
    over ``cap`` (the run's max_length); ``n`` itself below."""
    if n < BUCKET_FROM:
        return n
    step = max(8, (1 << (n.bit_length() - 1)) >> 4)
    m = -(-n // step) * step
    return max(n, min(m, cap)) if cap else m


class Collator:
    """Pads a batch to its own longest row (right padding); labels are padded with -100. With
    ``annotations``, what rows carry beside their tokens (:data:`ANNOTATIONS`: a multi-task row's task, a
    classification row's class) reaches the batch too, for the engine to take out before the forward.

    With length-grouped sampling (the engine's default) rows in a batch have similar lengths, so little
    compute goes to padding. With ``bucket``, the batch is padded further, to :func:`bucket_length` (at most
    ``cap``), so that batch shapes repeat from step to step: the C allocator then reuses the blocks a step
    freed instead of fragmenting its heap with every new length (docs/performance.md).
    """

    def __init__(self, pad_id: int, annotations: bool = False, bucket: bool = False, cap: int | None = None):
        self.pad_id, self.annotations, self.bucket, self.cap = pad_id, annotations, bucket, cap

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        n = bucket_length(n, self.cap) if self.bucket else n
        ids = torch.full((len(features), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.as_tensor(f["input_ids"])
            labels[i, :k] = torch.as_tensor(f["labels"])
            mask[i, :k] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        for k in ANNOTATIONS if self.annotations else ():
            if any(k in f for f in features):
                batch[k] = torch.tensor([f.get(k, -1) for f in features], dtype=torch.long)
        return batch


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
