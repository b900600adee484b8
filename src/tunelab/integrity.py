"""Whether a file tunelab reads back can be used: checked before any loader opens it.

Training refuses non-finite weights and never writes a half file; what is read back (a run's ``model/``
for ``eval``, ``generate``, ``merge``, ``export``, ``push`` and a teacher, a checkpoint to resume from, a
comparison's files) may still have been damaged since: cut short by a full disk or an interrupted copy, edited
by hand, swapped for a pickle. Every such read goes through this module first, so each refusal is one line
naming the file (docs/reliability.md, "What is read back"):

- safetensors: the header must parse and promise no more bytes than the file holds, and (where the values are
  read) every floating tensor must be finite;
- pickled weights (``.bin``, ``.pt``, ...): refused unless ``allow_pickle`` (unpickling can run code; torch's
  weights-only reader then refuses what is not plain tensors, in one line);
- JSON: must parse (a truncated ``adapter_config.json`` or ``summary.json``);
- GGUF: the header must parse and the tensor data it promises must be in the file.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import ModelError, RunError

PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
NON_FINITE = "holds non-finite values (NaN or inf)"


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be loaded (truncated, bad header), or None. Reads only the header."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "truncated (no header)"
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > 100 * 2**20:
                return "truncated or corrupt header"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"unreadable ({e.__class__.__name__})"
    if 8 + n + end > size:
        return f"truncated: {size} bytes, the header promises {8 + n + end}"
    return None


def non_finite_tensor(path: Path) -> str | None:
    """The name of the first floating tensor in a (whole) safetensors file holding NaN or inf, or None. Reads
    one tensor at a time, so the check costs one pass over the file and one tensor's memory."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            t = f.get_tensor(name)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return name
    return None


def torch_file_problem(path: Path) -> str | None:
    """torch.save files are zip archives whose directory sits at the end: a truncated one has none."""
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (OSError, zipfile.BadZipFile):
        return "truncated or corrupt"
    return None


def json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except json.JSONDecodeError as e:
        return f"line {e.lineno}: not valid JSON ({e.msg}); the file is truncated or damaged"
    return None


def gguf_problem(path: Path) -> str | None:
    """Why a GGUF file cannot be read (not GGUF, header or tensor data cut off), or None."""
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                return "not a GGUF file (it does not start with the GGUF magic)"
        from gguf import GGUFReader

        reader = GGUFReader(path)
        size = path.stat().st_size
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # noqa: BLE001 - the reader fails in many ways on a cut file (struct, numpy, ...)
        return f"unreadable: the header or tensor table is cut off or damaged ({e.__class__.__name__})"
    if end > size:
        return f"truncated: {size} bytes, its tensors end at byte {end}"
    return None


PICKLE_REFUSED = (
    "pickled weights: unpickling a file can run code from it, so tunelab refuses; convert it to safetensors, "
    "or set allow_pickle: true if you trust the file"
)


def file_problem(path: Path, *, allow_pickle: bool) -> str | None:
    """Why ``path`` must not be read back, or None. A safetensors file's tensors are read and must be finite;
    a pickle read under ``allow_pickle`` is left to the loader (whose failure is one line too)."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        problem = safetensors_problem(path)
        if problem is None and (bad := non_finite_tensor(path)):
            problem = f"tensor {bad} {NON_FINITE}"
        return problem
    if suffix in PICKLED:
        return None if allow_pickle else PICKLE_REFUSED
    if suffix == ".json":
        return json_problem(path)
    if suffix == ".gguf":
        return gguf_problem(path)
    return None


def check_files(root: Path, *, allow_pickle: bool = False) -> None:
    """Refuse ``root`` (a directory, searched recursively, or one file) when any file in it is damaged,
    pickled without ``allow_pickle``, or holds a non-finite tensor: a :class:`ModelError` naming the file."""
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for f in files:
        problem = file_problem(f, allow_pickle=allow_pickle)
        if problem:
            hint = "" if problem == PICKLE_REFUSED else "; restore the file or train again"
            raise ModelError(f"{f}: {problem}{hint}")


def check_loaded(model: torch.nn.Module, where: Path | str) -> None:
    """Refuse a loaded model holding a non-finite parameter or buffer (the last line, after the files were
    checked: e.g. pickled weights read under ``allow_pickle``)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(t.detach().isfinite().all()):
            raise ModelError(f"{where}: weight {name} {NON_FINITE}; restore the files or train again")


def read_json(path: Path, *, what: str = "") -> Any:
    """A JSON file tunelab wrote, or a :class:`RunError` naming it (and ``what`` it belongs to) when it is
    missing, truncated or damaged."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        problem = "missing"
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = json_problem(Path(path)) or e.__class__.__name__
    except OSError as e:
        problem = f"unreadable ({e.strerror})"
    raise RunError(f"{path}: {problem}{f' ({what})' if what else ''}")
