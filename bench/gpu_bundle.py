"""What bench/gpu_check.sh needs on a CUDA machine that reaches no package registry, in one folder to copy
there (issue 23, point 6):

    python bench/gpu_bundle.py DIR [--python 3.12] [--cuda 130] [--model smollm2-135m-instruct]

- ``DIR/wheels``: the packages tunelab and the check import that a CUDA image with torch, transformers and
  triton (and the scientific stack: numpy, pandas, pyarrow, scipy, matplotlib) lacks, at the versions this
  environment runs, built for that machine's Python. bitsandbytes keeps only the library for ``--cuda`` (its
  wheel carries one per CUDA release, 43 MB; trimmed, 3.6 MB), so the folder fits a small transfer.
- ``DIR/model``: the model's config and tokenizer, without weights (the default model's are 98 MB as GGUF,
  270 MB as bf16). ``--random-weights`` trains its architecture from random weights: tokens/s and memory
  are those of the trained model, its losses are not.

On the CUDA machine, from this checkout: ``WHEELS=DIR/wheels bench/gpu_check.sh --model DIR/model
--random-weights``. The wheels go into a folder of their own, first on the path; the machine's torch and
transformers stay as they are.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

#: packages a CUDA image with torch and transformers lacks: tunelab's own dependencies, TRL for the side by
#: side, bitsandbytes for QLoRA
PACKAGES = (
    "accelerate",
    "peft",
    "trl",
    "datasets",
    "dill",
    "multiprocess",
    "fsspec",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "gguf",
    "bm25s",
    "bitsandbytes",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def pin(package: str) -> str:
    """The version this environment runs; the newest where it has none (bitsandbytes: CUDA machines only)."""
    try:
        return f"{package}=={version(package)}"
    except PackageNotFoundError:
        return package


def trim_bitsandbytes(wheel: Path, cuda: str) -> None:
    """Rewrites ``wheel`` without the native libraries of every CUDA release but ``cuda`` (e.g. "130") and
    every other backend, and without their RECORD lines (the list of files pip uninstalls by)."""
    keep = re.compile(rf"libbitsandbytes_(cpu|cuda{cuda})\.so$")
    drop = re.compile(r"libbitsandbytes_\w+\.so$")

    def dropped(name: str) -> bool:
        return bool(drop.search(name)) and not keep.search(name)

    with zipfile.ZipFile(wheel) as src:
        if not any(keep.search(n) and "cuda" in n for n in src.namelist()):
            raise SystemExit(f"{wheel.name} has no library for CUDA {cuda}")
        trimmed = wheel.with_suffix(".tmp")
        try:
            with zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as out:
                for item in src.infolist():
                    if dropped(item.filename):
                        continue
                    data = src.read(item)
                    if item.filename.endswith(".dist-info/RECORD"):
                        lines = data.decode().splitlines(keepends=True)
                        data = "".join(x for x in lines if not dropped(x.split(",")[0])).encode()
                    out.writestr(item, data)
        except BaseException:
            trimmed.unlink(missing_ok=True)  # no half-written wheel left beside the whole one
            raise
    trimmed.replace(wheel)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--python", default="3.12", help="the CUDA machine's Python, major.minor")
    ap.add_argument(
        "--cuda", default="130", help="its CUDA release as torch names it (torch.version.cuda 13.0: 130)"
    )
    ap.add_argument("--model", default="smollm2-135m-instruct")
    a = ap.parse_args()
    wheels = a.dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pins = [pin(p) for p in PACKAGES]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(wheels)]
    cmd += ["--python-version", a.python, "--implementation", "cp"]
    cmd += [x for p in PLATFORMS for x in ("--platform", p)]
    subprocess.run([*cmd, *pins], check=True)
    for w in wheels.glob("bitsandbytes-*.whl"):
        trim_bitsandbytes(w, a.cuda)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from transformers import AutoConfig

    from tunelab.models import load_tokenizer, resolve_model

    # the config and tokenizer as transformers writes them, whatever files hold them
    source = resolve_model(a.model)
    AutoConfig.from_pretrained(source, local_files_only=True).save_pretrained(a.dir / "model")
    load_tokenizer(source).save_pretrained(a.dir / "model")
    size = sum(f.stat().st_size for f in a.dir.rglob("*") if f.is_file())
    n = len(list(wheels.glob("*.whl")))
    print(f"{a.dir}: {n} wheels and {a.model}'s config and tokenizer, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
