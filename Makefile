# `make run`: install into .venv (once) and run the default pipeline.
# `make test`: install into .venv (once) and run the test suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
PIP := $(BIN)/pip install --disable-pip-version-check --progress-bar off -qq

.PHONY: install browser postgres run test ui docs reference deploy bench bench-mia bench-tracin bench-memory bench-rollout bench-vllm bench-losses bench-pool gpu-check gpu-wheels clean clean-all

install: $(STAMP)

# torch first: 2.13.0 is the CPU build that installs from a local file here; asking for it
# before anything else keeps pip from pulling a multi-GB CUDA build as a dependency.
# DeepSpeed ships as an sdist: built against that torch (no build isolation), before the rest.
$(STAMP): pyproject.toml requirements.lock requirements-vllm.lock
	@echo "==> installing into $(VENV) (once)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) --no-build-isolation deepspeed==0.19.8
	$(PIP) -r requirements.lock
	$(PIP) --no-deps -e .
	@# vLLM's CPU build for train.rollout.backend=vllm, exact pins without its own deps (why: requirements-vllm.lock)
	$(PIP) --no-deps -r requirements-vllm.lock
	@# DeepSpeed JIT-builds its CPU shared-memory comm op on first use (~1 min): do it here, once,
	@# rather than inside the first training (where an interrupted build leaves a lock behind).
	$(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	@# Likewise DeepSpeed's CPU Adam, which train.deepspeed.offload_optimizer steps the offloaded state with.
	$(BIN)/python -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"
	touch $@

run: install
	@[ -d .git ] || git init -q  # DVC keeps its state beside a git repo
	grpolab run

# Debian's headless Chromium, for the test that opens the MLflow UI in a browser (root or sudo, once).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || { echo "==> installing Debian's chromium (once)"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# Debian's PostgreSQL server, for the tests that run an MLflow tracking server on it (root or sudo, once).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { \
	  echo "==> installing Debian's postgresql (once)"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

# Two workers (CI's two cores), a test file on one worker (its module fixtures built once; pytest-xdist's
# loadgroup does not group here). The five longest files first, in this order (test_pipeline on one worker, the
# next four on the other as they free), then the rest as workers free.
test: install browser postgres
	pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests/test_pipeline.py tests/test_lab.py tests/test_study.py tests/test_train.py tests/test_vllm.py \
	  tests/test_train_processes.py tests

# The Prefect deployments of prefect.yaml on a `process` work pool, against the Prefect server that
# PREFECT_API_URL names (e.g. `prefect server start` elsewhere); then start `prefect worker start --pool grpolab`.
POOL ?= grpolab
deploy: install
	@[ -n "$$PREFECT_API_URL" ] || { echo "set PREFECT_API_URL to your Prefect server's API (http://HOST:4200/api)"; exit 2; }
	prefect work-pool create $(POOL) --type process --overwrite
	prefect --no-prompt deploy --all --pool $(POOL)

ui: install
	grpolab ui

# grpolab vs TRL's GRPOTrainer, side by side (needs models/base from `make run`)
# The manual (docs/, MkDocs Material) on http://127.0.0.1:8000; the suite builds it with --strict.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve -a 127.0.0.1:8000

# The generated reference pages, from the pydantic models and the CLI's parser (a test keeps them current).
reference: install
	$(BIN)/python -c "from grpolab import config; import re, pathlib; p = pathlib.Path('docs/reference/params.md'); \
	  t = p.read_text(); p.write_text(t[: t.index('| key | type |')] + config.params_reference())"
	$(BIN)/python -c "from grpolab.cli import cli_reference; import pathlib; p = pathlib.Path('docs/reference/cli.md'); \
	  t = p.read_text(); p.write_text(t[: t.index('## ')] + cli_reference())"

bench: install
	$(PIP) -r bench/requirements.txt
	python bench/bench_trl.py

# what Min-K%++ scoring and the MIA-weighted loss cost (needs `make run` first)
bench-mia: install
	python bench/bench_mia.py

# what TracIn's influence pass costs against plain GRPO and a naive per-completion backward (needs `make run` first)
bench-tracin: install
	python bench/bench_tracin.py

# peak memory of a train step, a TracIn step and an eval pass at Qwen2.5's vocabulary, against the commit before the GPU-path work
bench-memory: install
	python bench/bench_memory.py

# rollout.sample against transformers' model.generate, same settings, alternating blocks
bench-rollout: install
	python bench/bench_rollout.py

# the rollout backends' tokens/s side by side: vLLM's sampler, grpolab's decoder, model.generate (SHAPE=qwen2.5-0.5b: 494 M)
SHAPE ?= default
bench-vllm: install
	python bench/bench_vllm.py --shape $(SHAPE)

# what each policy loss, aggregation and the entropy bonus cost per step against plain GRPO (needs `make run` first)
bench-losses: install
	python bench/bench_losses.py

# a study through a Prefect work pool with two workers against --jobs 2 (PostgreSQL, MLflow and Prefect servers on 127.0.0.1)
bench-pool: install
	python bench/bench_pool.py

# the GPU check (bench/gpu_check.py): a few minutes on one GPU, its figures in gpu_check.json
gpu-check: install
	python bench/gpu_check.py --out gpu_check.json

# What bench/gpu_check.py needs on a GPU machine whose Python has torch and transformers (and numpy, pandas, pyarrow,
# tqdm) only, as wheels in $(WHEELS), at requirements.lock's versions: DeepSpeed built here with its ops off (the GPU
# path JIT-builds none of them), its pure-Python needs, pydantic and ruamel.yaml. For GPU_PYTHON's CPython: pydantic_core
# and msgpack are built per version. typing_extensions too: pydantic_core needs a newer one than such a machine may have.
# No `install`: DeepSpeed's sdist builds in pip's isolated build environment, without torch; with DS_BUILD_OPS=0 its
# setup.py then records torch 0.0 (the "detect at runtime" value DeepSpeed's op loaders read) and installs no op: the
# same wheel as one built against .venv's CPU torch. tests/test_gpu_check.py runs the check on these wheels.
GPU_PYTHON ?= 3.12
WHEELS ?= .whl
GPU_WHEELS := hjson msgpack ninja psutil py-cpuinfo einops pydantic pydantic_core annotated-types typing-inspection \
  typing_extensions ruamel.yaml
gpu-wheels:
	rm -rf $(WHEELS)
	DS_BUILD_OPS=0 $(PYTHON) -m pip wheel -q --disable-pip-version-check --no-deps -w $(WHEELS) deepspeed==0.19.8
	$(PYTHON) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d $(WHEELS) $$(for p in $(GPU_WHEELS); do grep -i "^$$p==" requirements.lock; done)
	@ls $(WHEELS)

# the pipeline's outputs (as dvc.yaml names them), dvc.lock and checkpoints; each path deleted is printed
clean: install
	grpolab clean

# also the MLflow store, DVC's cache and reports/: every result of every past run
clean-all: install
	grpolab clean --all
