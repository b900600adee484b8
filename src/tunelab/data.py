"""Training data: loading local files, rendering the four row shapes, and exact loss masks.

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

Long because reading (JSON, CSV, Parquet with line numbers and text kept as written), rendering and masking
are one pipeline whose errors must name the same file and line; each part is a short function.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import first_line

IGNORE = -100
LOADERS = (".jsonl", ".json", ".csv", ".parquet")
#: What a row may carry beside its tokens, for the engine and strategies, never for the model's forward:
#: its task's index (multi-task runs) and its class's index in the label set (classification rows; -1 none).
ANNOTATIONS = ("task", "class")


class DataError(ValueError):
    pass


@dataclass
class DataStats:
    rows: int = 0
    used: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)  # the first few, for the summary

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "used": self.used, "skipped": self.skipped, "skip_reasons": self.reasons[:10]}


# ----------------------------------------------------------------------------- reading files


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte-order mark is dropped
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {col}); save the file as UTF-8"
        ) from None


def _read_json_lines(path: Path, text: str) -> tuple[list[dict], list[int]]:
    rows, lines = [], []
    for i, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: each line must be a JSON object, got {type(obj).__name__}")
        rows.append(obj)
        lines.append(i)
    return rows, lines


def _read_json(path: Path, text: str) -> tuple[list[dict], list[int] | None]:
    if path.suffix == ".jsonl":
        return _read_json_lines(path, text)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines in a .json file
            return _read_json_lines(path, text)
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"{path}: a .json file must hold a list of objects (one per row), or one object per line")
    return obj, None


def _read_csv(path: Path, text: str) -> tuple[list[dict], list[int]]:
    """Every cell as the string in the file: no type guessing, "NA" stays "NA", "007" stays "007"."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, lines, last = [], [], 1  # line 1 is the header
    try:
        for row in reader:
            rows.append({k: v for k, v in row.items() if k is not None})  # cells past the header are dropped
            lines.append(last + 1)
            last = reader.line_num
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    return rows, lines


def read_rows_with_lines(path: str | Path) -> tuple[list[dict[str, Any]], list[int] | None]:
    """Rows of a local JSONL/JSON/CSV/Parquet file, and the line each row starts on (None for Parquet and
    JSON arrays).

    Text reaches training exactly as written: JSON and CSV are read with the standard library, not with
    loaders that infer types (which turn "2021-03-04" into a date, "007" into 7 and "NA" into a missing
    value). Parquet files carry their own column types and are read with ``datasets``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path.resolve()}")
    suffix = path.suffix.lower()
    if suffix not in LOADERS:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(LOADERS)}")
    if suffix in (".jsonl", ".json"):
        return _read_json(path, _decode(path))
    if suffix == ".csv":
        return _read_csv(path, _decode(path))
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train", keep_in_memory=True)
    except Exception as e:  # datasets raises many types for unreadable files
        raise DataError(f"{path}: could not be read as parquet: {first_line(e)}") from None
    return ds.to_list(), None


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

    # -- helpers --------------------------------------------------------------------------------
    def _template(self, messages, generation_prompt=False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.cfg.system_prompt and (not messages or messages[0].get("role") != "system"):
            return [{"role": "system", "content": self.cfg.system_prompt}, *messages]
        return messages

    def render_chat(self, messages: list[dict]) -> Rendered:
        msgs = self._with_system(messages)
        full = self._template(msgs)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = len(self._template(msgs[:i], generation_prompt=True)) if i else 0
            end = len(self._template(msgs[: i + 1]))
            if not full.startswith(self._template(msgs[: i + 1])):
                raise DataError("the tokenizer's chat template is not prefix-stable; use data.template: plain")
            spans.append((start, end))
        last = msgs[-1]
        prompt = reference = None
        if last["role"] == "assistant":
            prompt = self._template(msgs[:-1], generation_prompt=True)
            reference = last["content"]
        return Rendered(full, spans, prompt, reference, special=False)

    def render_pair(self, prompt: str, completion: str) -> Rendered:
        if self.chat:
            shown = [{"role": r, "content": c} for p, a in self.shots for r, c in (("user", p), ("assistant", a))]
            r = self.render_chat(
                [*shown, {"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            )
            r.spans = r.spans[-1:]  # the shown answers carry no loss: only the row's own
            return r
        prompt = "".join(f"{p}{a}\n\n" for p, a in self.shots) + prompt
        text = prompt + completion + self.eos
        return Rendered(text, [(len(prompt), len(text))], prompt, completion)

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

    # -- one row --------------------------------------------------------------------------------
    def render(self, row: dict[str, Any]) -> Rendered:
        if self.fmt == "text":
            text = _need_text(row, "text")
            return Rendered(text + self.eos, [(0, len(text) + len(self.eos))])
        if self.fmt == "prompt_completion":
            return self.render_pair(_need_str(row, "prompt"), _need_text(row, "completion"))
        if self.fmt == "classification":
            text, label = _need_str(row, "text"), row.get("label")
            if label is None or (isinstance(label, str) and not label.strip()):
                raise ValueError("missing field 'label'")
            label = str(label)
            if self.labels is not None and label not in self.labels:
                raise ValueError(f"label {label!r} is not among the training labels {self.labels}")
            prompt = self.cfg.instruction.format(text=text, labels=", ".join(self.labels or [label]))
            return self.render_pair(prompt, label)
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
        return self.render_chat(clean)

    # -- tokens ---------------------------------------------------------------------------------
    def tokenize(self, r: Rendered, max_length: int, train_on: str) -> dict[str, Any]:
        limit = (max_length + 16) * self.max_token_chars
        text = r.text[:limit]
        enc = self.tok(text, add_special_tokens=r.special, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        # A token trains when it overlaps a loss span: one that straddles the prompt/completion boundary
        # carries completion characters, so it must be predicted too.
        if train_on == "all":
            labels = list(ids)
        else:
            labels = [
                t if any(a < e and b > s for s, e in r.spans) else IGNORE
                for t, (a, b) in zip(ids, offsets, strict=True)
            ]
        full_len = f"{len(ids)}{'+' if len(text) < len(r.text) else ''}"
        ids, labels = ids[:max_length], labels[:max_length]
        if all(x == IGNORE for x in labels):
            raise ValueError(
                f"no trainable token after truncation to training.max_length={max_length} "
                f"(row is {full_len} tokens)"
            )
        return {"input_ids": ids, "labels": labels, "length": len(ids)}


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
    """A tokenized split plus what scoring needs: prompts and references (None for LM-only data)."""

    features: list[dict[str, Any]]
    prompts: list[tuple[str, bool] | None]  # (prompt text, add special tokens)
    references: list[str | None]
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


def features_dataset(features: list[dict[str, Any]]):
    """Tokenized rows as a ``datasets.Dataset`` (the columns the collator and length grouping read)."""
    import datasets

    columns = {k: [f[k] for f in features] for k in ("input_ids", "labels", "length")}
    for k in ANNOTATIONS:
        if any(k in f for f in features):
            columns[k] = [f.get(k, -1) for f in features]
    return datasets.Dataset.from_dict(columns)


def _apply_columns(rows: list[dict], mapping: dict[str, str]) -> list[dict]:
    if not mapping:
        return rows
    return [{**row, **{ours: row.get(theirs) for ours, theirs in mapping.items()}} for row in rows]


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
    """Render and tokenize ``rows``. ``shots``: solved (prompt, answer) pairs shown before every row, or a
    function of a row's prompt giving its own (BM25-nearest examples)."""
    rows = _apply_columns(rows, data_cfg.columns)
    if not rows:
        raise DataError(f"{source}: no rows")
    if fmt is None:
        fmt = data_cfg.format if data_cfg.format != "auto" else detect_format(set(rows[0]))
    if fmt == "classification" and labels is None:
        labels = sorted({str(r["label"]) for r in rows if r.get("label") is not None})
    per_row = shots if callable(shots) else None
    formatter = Formatter(tokenizer, data_cfg, fmt, labels, () if per_row else shots)
    stats = DataStats(rows=len(rows))
    out = Prepared([], [], [], stats, fmt, labels)
    for i, row in enumerate(rows):
        try:
            if per_row is not None:
                formatter.shots = per_row(formatter.pair(row)[0])
            r = formatter.render(row)
            feats = formatter.tokenize(r, max_length, data_cfg.train_on)
        except DataError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            where = f"{source}:{lines[i]}" if lines and i < len(lines) else f"{source}: row {i + 1}"
            if not data_cfg.skip_bad_rows:
                raise DataError(f"{where}: {e} (set data.skip_bad_rows: true to skip such rows)") from None
            stats.skipped += 1
            stats.reasons.append(f"{where}: {e}")
            continue
        if fmt == "classification":
            feats["class"] = labels.index(r.reference) if r.reference in labels else -1
        out.features.append(feats)
        out.prompts.append((r.prompt, r.special) if r.prompt is not None else None)
        out.references.append(r.reference)
    stats.used = len(out.features)
    if not out.features:
        raise DataError(f"{source}: every row was skipped; first: {stats.reasons[0] if stats.reasons else '?'}")
    return out


def prepare_file(path, tokenizer, data_cfg, max_length, *, fmt=None, labels=None, shots=()) -> Prepared:
    path = Path(path)
    rows, lines = read_rows_with_lines(path)
    return prepare_rows(
        rows,
        tokenizer,
        data_cfg,
        max_length,
        source=str(path),
        lines=lines,
        fmt=fmt,
        labels=labels,
        shots=shots,
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


def _carve(rows: list, lines: list[int] | None, n: int, seed: int) -> tuple[tuple, tuple]:
    """``n`` rows drawn with ``seed`` (in file order) and the rest: ((rows, lines), (rows, lines))."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    out, keep = sorted(order[:n]), sorted(order[n:])

    def pick(idx: list[int]) -> tuple:
        return [rows[i] for i in idx], [lines[i] for i in idx] if lines else None

    return pick(out), pick(keep)


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
    data_cfg, tokenizer, max_length: int, seed: int, shots: Shots | int = 0, score_on: str = "eval"
) -> tuple[Prepared, Prepared | None]:
    """The training split and the split the run is scored on: the eval split (a file, a held-out fraction, or
    none), or with ``score_on="dev"`` the dev split (``data.dev``, or rows ``data.dev_split`` carves from
    train; the eval file is then never opened). Dev rows never train, whichever split is scored. Carving uses
    ``data.split_seed``, never the training seed, so every seed of a comparison sees the same splits. With
    ``shots`` (:class:`Shots`, or a number k), k training rows (drawn with ``seed``, or the nearest by BM25)
    are shown as solved examples before every prompt scored."""
    train_path = Path(data_cfg.train)
    rows, lines = read_rows_with_lines(train_path)
    eval_rows = eval_lines = None
    split_seed = getattr(data_cfg, "split_seed", 0)
    if data_cfg.eval_split:
        n_eval = max(1, round(len(rows) * data_cfg.eval_split))
        (eval_rows, eval_lines), (rows, lines) = _carve(rows, lines, n_eval, split_seed)
    dev = None
    if getattr(data_cfg, "dev", None):
        dev = (*read_rows_with_lines(data_cfg.dev), data_cfg.dev)
    elif getattr(data_cfg, "dev_split", None):
        (dev_r, dev_l), (rows, lines) = _carve(
            rows, lines, dev_rows(data_cfg, len(rows), str(train_path)), split_seed + 1
        )
        dev = (dev_r, dev_l, str(train_path))
    train = prepare_rows(rows, tokenizer, data_cfg, max_length, source=str(train_path), lines=lines)
    shots = shots if isinstance(shots, Shots) else Shots(k=int(shots))
    examples: Any = []
    if shots.k:
        formatter = Formatter(tokenizer, data_cfg, train.format, train.labels)
        if shots.select == "bm25":
            examples = _nearest([formatter.pair(r) for r in _apply_columns(rows, data_cfg.columns)], shots.k)
        else:
            g = torch.Generator().manual_seed(seed)
            drawn = torch.randperm(len(rows), generator=g).tolist()[: shots.k]
            examples = [formatter.pair(r) for r in _apply_columns([rows[i] for i in drawn], data_cfg.columns)]
    shown_cfg = data_cfg
    if shots.system_prompt is not None:
        shown_cfg = data_cfg.model_copy(update={"system_prompt": shots.system_prompt})

    def scored(rows_, lines_, source) -> Prepared:
        return prepare_rows(
            rows_, tokenizer, shown_cfg, max_length, source=str(source), lines=lines_, fmt=train.format,
            labels=train.labels, shots=examples,
        )  # fmt: skip

    if score_on == "dev":
        if dev is None:
            raise DataError("eval.split: dev needs a dev split: give data.dev or data.dev_split")
        return train, scored(*dev)
    if data_cfg.eval:
        rows_, lines_ = read_rows_with_lines(data_cfg.eval)
        return train, scored(rows_, lines_, data_cfg.eval)
    return train, scored(eval_rows, eval_lines, train_path) if eval_rows else None


# ----------------------------------------------------------------------------- batching


class Collator:
    """Pads a batch to its own longest row (right padding); labels are padded with -100. With
    ``annotations``, what rows carry beside their tokens (:data:`ANNOTATIONS`: a multi-task row's task, a
    classification row's class) reaches the batch too, for the engine to take out before the forward.

    With length-grouped sampling (the engine's default) rows in a batch have similar lengths, so little
    compute goes to padding.
    """

    def __init__(self, pad_id: int, annotations: bool = False):
        self.pad_id, self.annotations = pad_id, annotations

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
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


def batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
