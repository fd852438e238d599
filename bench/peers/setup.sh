#!/usr/bin/env bash
# The peers' virtual environment for bench/peers.py, outside the repository (default /work/peers-venv,
# override with PEERS_VENV): OpenRLHF's reward server (`python -m openrlhf.cli.serve_rm`) and the naive
# FastAPI + transformers endpoint (bench/peers/naive_server.py) run from it, never from .venv.
#
# openrlhf pins ray, vllm-era CUDA wheels, wandb ... that serve_rm never imports, so it goes in with
# --no-deps and only what its import chain needs follows. torch is the CPU wheel first (any other spec
# pulls GBs of CUDA), deepspeed builds no ops (DS_BUILD_OPS=0) and flash-attn installs its Python files
# only (FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE); it is imported with FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE, which
# needs the triton package importable (its kernels never run on a CPU): 3.4, of flash-attn 2.8.3's time (3.9 refuses
# its autotune keys at import)
# (FORCE_BUILD: no attempt to fetch a prebuilt CUDA wheel, whose URL needs a CUDA version) and serve_rm runs with --ds.attn_implementation sdpa. Idempotent: a stamp marks a finished install.
set -euo pipefail
VENV=${PEERS_VENV:-/work/peers-venv}
PYTHON=${PYTHON:-python3}
STAMP=$VENV/.peers-installed
if [ -f "$STAMP" ]; then echo "peers venv ready: $VENV"; exit 0; fi
$PYTHON -m venv "$VENV"
PIP="$VENV/bin/pip"
$PIP install --quiet --upgrade pip wheel setuptools
$PIP install --quiet torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
  || $PIP install --quiet torch==2.13.0   # a local CPU wheel (pip's find-links), where the index is unreachable
# serve_rm's import chain (openrlhf.models / openrlhf.utils) and its HTTP server; transformers as openrlhf pins it.
$PIP install --quiet transformers==5.15.0 accelerate peft einops sympy pylatexenc torchdata pillow aiohttp \
  fastapi uvicorn numpy packaging triton==3.4.0 psutil py-cpuinfo pydantic hjson msgpack ninja tqdm
DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 $PIP install --quiet --no-build-isolation deepspeed==0.19.6
FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE $PIP install --quiet --no-build-isolation --no-deps flash-attn==2.8.3
$PIP install --quiet --no-deps openrlhf==0.11.2
FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE "$VENV/bin/python" -c "import openrlhf.cli.serve_rm, fastapi, uvicorn; print('serve_rm imports')"
touch "$STAMP"
echo "peers venv ready: $VENV"
