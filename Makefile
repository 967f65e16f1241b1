# Two entry points, both self-contained on a fresh clone:
#   make demo   install into .venv and run the whole flow on the built-in digits
#   make test   install into .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# torch and torchvision are pinned to the releases this project is tested with.
TORCH   = torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[lite,dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/embedcache demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check embedcache tests benchmarks
	$(BIN)/ruff format --check embedcache tests benchmarks

clean:
	rm -rf runs data/digits .pytest_cache
