#!/usr/bin/env bash
# Wheels of the packages the offline GPU machine's image lacks (its python3 is 3.12 with CUDA
# torch, transformers, numpy, grpcio...; see docs/benchmarks.md), at this venv's versions, into
# bench/wheels (ignored by git; carried with the tree, which is capped at 64 MiB). gpu_check.sh
# installs them with pip --no-index into a folder of their own.
#   make gpu-wheels            # or: bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/wheels}
# grpcio and protobuf travel too: the generated stubs need grpcio >= 1.85.1 and protobuf 7.
PKGS="duckdb pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
typing-extensions starlette uvicorn grpcio grpcio-health-checking grpcio-reflection protobuf tensorboardX"
# shellcheck disable=SC2086
pins=$("$PY" -c 'import importlib.metadata as m, sys; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $PKGS)
rm -rf "$OUT" && mkdir -p "$OUT"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$OUT" $pins
size=$(du -sm "$OUT" | cut -f1)
echo "$OUT: $(ls "$OUT" | wc -l) wheels, ${size} MiB"
[ "$size" -lt 64 ] || { echo "over 64 MiB: the tree cannot carry them" >&2; exit 1; }
