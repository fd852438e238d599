#!/usr/bin/env bash
# bench/gpu_check.sh's carried-wheel path tried here, under Python 3.12 as on the offline GPU
# machine: a venv of its own (outside the checkout) holding the GPU image's versions of what that
# image has (torch 2.11, transformers 5.17, numpy 2.5, ...; docs/benchmarks.md) and none of what
# bench/wheels carries, then `gpu_check.sh --tiny --device cpu --offline` run with it, so the
# wheels install into var/gpu-check-site as they will there. The venv is made once (~3 min, 3 GB).
#   bench/gpu_wheels.sh && bench/gpu_py312.sh        # PY312=/path/to/python3.12, SIM=venv folder
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY312:-}" ]; then  # the first python3.12 that runs (a pyenv shim may not)
  for candidate in python3.12 $(find "$HOME/.pyenv/versions" -path '*/3.12*/bin/python3.12' 2>/dev/null | sort -r); do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then PY312=$candidate; break; fi
  done
fi
[ -n "${PY312:-}" ] || { echo "gpu_py312: no python3.12 found; set PY312" >&2; exit 1; }
SIM=${SIM:-/tmp/rm-gpu-py312}
compgen -G "bench/wheels/*cp312*.whl" >/dev/null || { echo "gpu_py312: no Python 3.12 wheels; run bench/gpu_wheels.sh" >&2; exit 1; }
if [ ! -x "$SIM/bin/python" ]; then
  "$PY312" -m venv "$SIM"
  "$SIM/bin/pip" install -q torch==2.11.0 transformers==5.17.0 tokenizers==0.23.2 safetensors==0.8.0 numpy==2.5.2 \
    huggingface-hub==1.33.0 grpcio protobuf pyyaml tqdm httpx prometheus-client scipy scikit-learn psutil jinja2 matplotlib
  # what the GPU image lacks (pip brings pydantic in as a dependency of typer): bench/wheels carries it
  "$SIM/bin/pip" uninstall -y -q pydantic pydantic-core annotated-types typing-inspection pydantic-settings \
    python-dotenv duckdb starlette uvicorn grpcio-health-checking grpcio-reflection tensorboardX
fi
"$SIM/bin/python" -c 'import sys, torch, transformers; print("gpu_py312:", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)'
rm -rf var/gpu-check-site
PY="$SIM/bin/python" exec bash bench/gpu_check.sh --tiny --device cpu --offline "$@"
