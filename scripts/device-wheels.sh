#!/usr/bin/env bash
# bash scripts/device-wheels.sh
# The wheels the single-GPU check machine lacks (docs/gpu-clusters.md, "The device check"), for Python 3.12 on
# manylinux x86-64, into .whl/ (git-ignored), to travel with the checkout: run it where the package registries are
# reachable, then `bash scripts/device-check.sh` on the GPU machine installs them offline.
#
# That machine has Python 3.12 with torch (CUDA), transformers, tokenizers, safetensors, accelerate, pandas, pyarrow,
# numpy, pytest, triton, ninja and nvcc, and nothing else dice's stages import: pydantic (config), DeepSpeed (train,
# ZeRO-3 scoring) and its needs, TRL and datasets (the training benchmark's baseline). vLLM (~400 MB) does not
# travel: its GPU paths stay with the `gpu` tests of a full GPU machine. Versions are this checkout's environment's,
# so the check runs what the test suite ran. The whole folder must stay under 50 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=.whl
LIMIT_MIB=50

# name of the distribution as pip knows it, then the module that tells its version in this environment
PACKAGES=(
  pydantic pydantic_core annotated_types typing_inspection typing_extensions   # the typed config
  hjson msgpack py-cpuinfo einops                                            # DeepSpeed's own needs
  trl datasets dill multiprocess xxhash fsspec                               # the TRL baseline and its datasets
)
pins=$("$PY" - "${PACKAGES[@]}" <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{name.replace('_', '-')}=={version(name.replace('_', '-'))}" for name in sys.argv[1:]))
EOF
)
deepspeed=$("$PY" -c "from importlib.metadata import version; print(version('deepspeed'))")

rm -rf "$OUT"
mkdir -p "$OUT"
echo "downloading for Python 3.12 / manylinux x86-64: $pins"
# shellcheck disable=SC2086  # one argument per pin
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$OUT" $pins
# DeepSpeed ships an sdist: build a pure wheel here; its C++/CUDA ops are JIT-compiled on first use over there
echo "building deepspeed==$deepspeed as a wheel"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$deepspeed" -w "$OUT"

size_kib=$(du -sk "$OUT" | cut -f1)
echo "$(ls "$OUT" | wc -l) wheels in $OUT: $((size_kib / 1024)) MiB ($size_kib KiB)"
ls -1 "$OUT"
if (( size_kib > LIMIT_MIB * 1024 )); then
  echo "error: $OUT is over ${LIMIT_MIB} MiB; the checkout travels to the GPU machine in 64 MiB" >&2
  exit 1
fi
