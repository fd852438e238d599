#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): SmolLM2 full-mode fine-tune, bf16 serving of it and of a ~1B
# reward model at 64 clients, and 2 PPO steps, on one GPU, in one table. Budget: 8 minutes.
#   bench/gpu_check.sh [--out FILE] [any gpu_check.py flag]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
exec timeout 480 "$PY" bench/gpu_check.py --device cuda "$@"
