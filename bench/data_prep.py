"""Data preparation at the size users have: rows/s and peak memory of reading, rendering (the chat template)
and tokenizing a training file, from file to the dataset the trainer reads, for generated files of 10k,
100k and 1M rows, prompt/completion and messages rows (~70 tokens a row, the default model's tokenizer).

    python bench/data_prep.py [--sizes 10000,100000,1000000] [--formats prompt_completion,messages]
                              [--legacy-max 100000]

Rows, each in its own process (so its peak is its own):

- ``legacy``: the pipeline before issue 24 (src/tunelab/data.py at 5b1b6ef, read from git): the whole file
  in one string, one Python dict per row, rendered and tokenized row by row, features in Python lists, then
  ``datasets.Dataset.from_dict``. Run up to ``--legacy-max`` rows (it took ~17 minutes and more than 3.5 GB
  on the issue's 1M-row file);
- ``cold``: tunelab's Arrow pipeline with an empty ``TUNELAB_HOME`` (reading, rendering, tokenizing, writing
  the cache);
- ``warm``: the same again: the second run on the same file, tokenizer and options, from the cache;
- ``stream``: ``data.streaming``: the file indexed in place, then one epoch of the training stream (blocks
  prepared as they are read, in the one training process, through the shuffle buffer and length-sorted
  windows); ``first_batch_s`` is what stands before step 1 (the index pass and the first block).

Extra peak RSS = the process's peak resident memory minus its resident memory once the libraries and the
tokenizer are loaded (what the data costs). The workers' peak (forked, one per core, for 16k rows or more)
is given beside it: a forked worker's resident set counts the pages it shares with the process it was
forked from (about the baseline), so its own cost is that figure minus the baseline.
``--guide``: instead, the data preparation of every variant of ``tunelab compare --preset guide``, in the
order the comparison runs them, in one process each way: the legacy pipeline (every variant prepares its
files again) and the Arrow pipeline from an empty cache (the first variant prepares, the others map). The
retention sets and a prompt baseline's shown examples are left out (they are the same on both sides).

Nothing else may run meanwhile (2 cores). Writes bench/out/data_prep.json (or data_prep_guide.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from common import OUT, run_child

LEGACY_COMMIT = "5b1b6ef"
MAX_LENGTH = 256


def rows_of(fmt: str, n: int) -> Iterator[dict]:
    """``n`` rows of ~70 tokens: a sentence to translate (tunelab.builtin_tasks), as prompt/completion or as
    a chat with a system message. Generated one at a time: a bench process holding a million rows would
    lend its resident set to every child it starts (a child's ``ru_maxrss`` counts its parent's pages at
    the fork)."""
    from tunelab.builtin_tasks import make_translation

    base = make_translation(min(n, 50_000), seed=1)
    for i in range(n):
        r = base[i % len(base)]
        prompt = f"{r['prompt']} (request {i})"
        if fmt == "messages":
            yield {"messages": [{"role": "system", "content": "You translate support messages."},
                                {"role": "user", "content": prompt},
                                {"role": "assistant", "content": r["completion"]}]}  # fmt: skip
        else:
            yield {"prompt": prompt, "completion": r["completion"]}


def write_file(fmt: str, n: int, where: Path) -> Path:
    path = where / f"{fmt}-{n}.jsonl"
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as f:
            for r in rows_of(fmt, n):
                f.write(json.dumps(r) + "\n")
        tmp.rename(path)
    return path


def peak_mb() -> float:
    """This process's peak resident memory since it started: Linux's VmHWM, which exec resets (``ru_maxrss``
    keeps the forked parent's resident set)."""
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmHWM")) / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(a) -> None:
    from tunelab.config import DataConfig
    from tunelab.models import load_tokenizer

    tok = load_tokenizer(Path(a.model_dir))
    cfg = DataConfig(train=a.file)
    if a.row == "legacy":
        sys.path.insert(0, str(Path(a.legacy).parent))
        import legacy_data as data
    else:
        from tunelab import data
    import datasets  # noqa: F401 - imported before the baseline: what the data costs, not the libraries
    import pyarrow  # noqa: F401

    base = rss_mb()
    if a.row == "stream":
        return stream_child(a.file, tok, cfg, base)
    t = time.perf_counter()
    prepared = data.prepare_file(a.file, tok, cfg, MAX_LENGTH)
    ds = data.features_dataset(prepared.features)  # what the trainer reads
    seconds = time.perf_counter() - t
    peak = peak_mb()
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {
        "rows": len(ds),
        "seconds": round(seconds, 2),
        "rows_per_s": round(len(ds) / seconds),
        "base_mb": round(base),
        "extra_peak_mb": round(peak - base),
        "workers_peak_mb": round(workers),
    }
    print("RESULT " + json.dumps(result))


def stream_child(path: str, tok, cfg, base: float) -> None:
    """``data.streaming``: the index pass and the first batch (what stands before step 1), then one epoch of
    the stream (each block prepared as it is read, through the shuffle buffer and the length-sorted windows,
    in the training process)."""
    from tunelab.data import prepare_splits

    t = time.perf_counter()
    train, _ = prepare_splits(cfg, tok, MAX_LENGTH, seed=0, stream=8)
    rows = iter(train.features)
    for _ in range(8):
        next(rows)
    first = time.perf_counter() - t
    for _ in range(train.features.n - 8):
        next(rows)
    seconds = time.perf_counter() - t
    peak = peak_mb()
    result = {
        "rows": train.features.n,
        "seconds": round(seconds, 2),
        "rows_per_s": round(train.features.n / seconds),
        "first_batch_s": round(first, 2),
        "base_mb": round(base),
        "extra_peak_mb": round(peak - base),
        "workers_peak_mb": 0,
    }
    print("RESULT " + json.dumps(result))


def guide_child(a) -> None:
    """Prepare every guide variant's splits (and tasks) in turn; print the seconds per variant."""
    from tunelab.lab.grid import load_grid
    from tunelab.models import load_tokenizer

    tok = load_tokenizer(Path(a.model_dir))
    if a.row == "legacy":
        sys.path.insert(0, str(Path(a.legacy).parent))
        import legacy_data as data
    else:
        from tunelab import data
    _, runs = load_grid(a.file)
    per_variant = {}
    for name, cfg in runs.items():
        t = time.perf_counter()
        for d in [d for d in [cfg.data, *(cfg.tasks or [])] if d is not None]:
            data.prepare_splits(d, tok, cfg.training.max_length, cfg.training.seed, score_on=cfg.eval.split)
        per_variant[name] = round(time.perf_counter() - t, 3)
    print("RESULT " + json.dumps({"variants": per_variant, "total_s": round(sum(per_variant.values()), 2)}))


def guide(model_dir: str, legacy: Path, tmp: Path) -> None:
    from tunelab.lab.presets import write_preset

    grid = write_preset("guide", tmp / "guide")
    results = {}
    for row in ("legacy", "arrow"):
        os.environ["TUNELAB_HOME"] = str(tmp / f"home-{row}")
        r = run_child(__file__, "--child", "--guide", "--row", row, "--file", str(grid), "--model-dir", model_dir,
                      "--legacy", str(legacy))  # fmt: skip
        results[row] = r
        first = next(iter(r["variants"].values()))
        print(f"{row}: {r['total_s']} s over {len(r['variants'])} variants; the first {first} s")
    (OUT / "data_prep_guide.json").write_text(json.dumps(results, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--formats", default="prompt_completion,messages")
    ap.add_argument("--legacy-max", type=int, default=100_000)
    ap.add_argument("--only", help="run only these rows (legacy,cold,warm,stream)")
    ap.add_argument("--data-dir", help="where the generated files are kept (default: a temporary directory)")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--row")
    ap.add_argument("--file")
    ap.add_argument("--model-dir")
    ap.add_argument("--legacy")
    ap.add_argument("--guide", action="store_true", help="the data preparation of the guide preset's variants")
    a = ap.parse_args()
    if a.child:
        guide_child(a) if a.guide else child(a)
        return
    from tunelab.models import resolve_model

    model_dir = str(resolve_model("smollm2-135m-instruct"))  # converted once, in the user's home
    legacy_src = subprocess.run(["git", "show", f"{LEGACY_COMMIT}:src/tunelab/data.py"], capture_output=True,
                                text=True, check=True, cwd=Path(__file__).parent).stdout  # fmt: skip
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(a.data_dir or tmp)
        where.mkdir(parents=True, exist_ok=True)
        home = Path(tmp) / "home"
        legacy = Path(tmp) / "legacy" / "legacy_data.py"
        legacy.parent.mkdir()
        legacy.write_text(legacy_src)
        if a.guide:
            OUT.mkdir(exist_ok=True)
            guide(model_dir, legacy, Path(tmp))
            return
        for fmt in a.formats.split(","):
            for n in map(int, a.sizes.split(",")):
                path = write_file(fmt, n, where)
                mb = path.stat().st_size / 2**20
                rows = ["legacy"] if n <= a.legacy_max else []
                for row in [*rows, "cold", "warm", "stream"]:
                    if a.only and row not in a.only.split(","):
                        continue
                    print(f"running {fmt} / {n:,} rows ({mb:.0f} MB) / {row} ...", flush=True)
                    os.environ["TUNELAB_HOME"] = str(home / f"{fmt}-{n}")  # the data cache: empty, then warm
                    r = run_child(__file__, "--child", "--row", row, "--file", str(path), "--model-dir", model_dir,
                                  "--legacy", str(legacy))  # fmt: skip
                    results.setdefault(fmt, {}).setdefault(str(n), {})[row] = {**r, "file_mb": round(mb)}
                    print(f"  {r}", flush=True)
    OUT.mkdir(exist_ok=True)
    name = f"data_prep-{a.only.replace(',', '-')}.json" if a.only else "data_prep.json"  # a part: beside it
    (OUT / name).write_text(json.dumps(results, indent=2))
    print(f"\n{'format':18}{'rows':>10}{'row':>8}{'seconds':>10}{'rows/s':>10}{'extra MB':>10}{'workers MB':>12}"
          f"{'1st batch s':>12}")  # fmt: skip
    for fmt, by_n in results.items():
        for n, by_row in by_n.items():
            for row, r in by_row.items():
                print(f"{fmt:18}{int(n):>10,}{row:>8}{r['seconds']:>10}{r['rows_per_s']:>10,}"
                      f"{r['extra_peak_mb']:>10}{r['workers_peak_mb']:>12}"
                      f"{r.get('first_batch_s', ''):>12}")  # fmt: skip


if __name__ == "__main__":
    main()
