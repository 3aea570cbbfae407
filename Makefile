# Set-up and everyday commands. `make demo` and `make test` each create the environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The tested torch/torchvision pair. `===` (exact version, no local label) picks the registry's build rather than a
# CPU-only "+cpu" wheel from a local find-links folder, which registry torchvision cannot import with.
TORCH_PIN ?= torch===2.13.0 torchvision===0.28.0

.PHONY: setup demo test lint format clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $@

demo: setup
	$(BIN)/internvit demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
