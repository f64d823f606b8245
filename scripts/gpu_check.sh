#!/usr/bin/env bash
# The GPU check in one command, for a CUDA machine with no network (scripts/gpu_check.py says what it runs).
#
#   scripts/gpu_check.sh [REPORT.json]        default: gpu_check.json (or $OUT/gpu_check.json when $OUT is set)
#
# It uses the machine's python3 with its own torch, transformers, accelerate, peft, safetensors, typer, rich,
# pyyaml (any recent versions). What lorafit needs beyond those travels as wheels in .whl/ (made on a machine
# with network by `make gpu-wheels`: bitsandbytes, datasets, dill, multiprocess, pydantic, pydantic-core,
# annotated-types, typing-inspection, typing-extensions, gguf; about 46 MB for CPython 3.12) and is installed into /tmp/site,
# never into the machine's environment. lorafit itself runs from this checkout (PYTHONPATH), not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
report="${1:-${OUT:-.}/gpu_check.json}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl/ failed" >&2; exit 2; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
missing=$(python3 - <<'PY'
import importlib.util
need = ["torch", "transformers", "accelerate", "safetensors", "typer", "rich", "yaml", "pydantic", "datasets",
        "bitsandbytes", "gguf", "matplotlib", "pytest", "peft"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  echo "gpu_check: missing Python packages: $missing (bring them as wheels in .whl/: make gpu-wheels)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 470 python3 scripts/gpu_check.py --json "$report"
