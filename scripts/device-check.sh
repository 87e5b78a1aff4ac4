#!/usr/bin/env bash
# bash scripts/device-check.sh [--cpu] [--out DIR] [--model DIR] [--skip-benchmarks]
# dice's GPU paths on ONE GPU in at most 9 minutes (docs/gpu-clusters.md, "The device check"): the `gpu` tests that
# need no vLLM; pairs -> reference -> train in bf16 at ZeRO-0 and ZeRO-3 with checkpointing off and on (peak memory
# next to `dice plan`'s estimate, step 0's DPO margin); the train and label benchmarks against TRL and transformers.
# Writes device-check.json and device-check.md to DIR (default runs/device-check, or $OUT/device-check when the
# device runner sets OUT). scripts/device_check.py has the steps.
#
# On the check machine (Python 3.12, torch, transformers; no network), the wheels `bash scripts/device-wheels.sh`
# put in .whl/ are installed offline into .site/ first. `--cpu` runs the same steps on the tiny model on this CPU
# in at most 3 minutes with the project's .venv (the test suite runs it: tests/test_device_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=gpu
args=()
while (($#)); do
  case "$1" in
    --cpu) mode=cpu ;;
    *) args+=("$1") ;;
  esac
  shift
done
default_out=runs/device-check
if [[ -n "${OUT:-}" ]]; then default_out="$OUT/device-check"; fi

if [[ $mode == gpu ]]; then
  PY=${PYTHON:-python3}
  if compgen -G ".whl/*.whl" >/dev/null; then
    rm -rf .site
    "$PY" -m pip install -q --no-index --no-deps --target .site .whl/*.whl
  elif ! "$PY" -c "import deepspeed, pydantic" 2>/dev/null; then
    echo "error: no .whl/ wheels and no DeepSpeed/pydantic here: run bash scripts/device-wheels.sh where the package" \
         "registries are reachable and carry .whl/ with the checkout" >&2
    exit 2
  fi
  export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  PY=${PYTHON:-.venv/bin/python}
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" scripts/device_check.py --mode "$mode" --out "$default_out" ${args[@]+"${args[@]}"}
