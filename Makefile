# Two entry points: `make book` builds the HTML book, `make test` runs every test.
# Both create a virtual environment in .venv on first use and install the package into it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# An offline copy of the datasets beside the checkout is used when present and nothing else is set.
ifeq ($(origin DIFFUSION_LIB_DATA), undefined)
ifneq ($(wildcard ../shared/data/MNIST),)
export DIFFUSION_LIB_DATA := $(abspath ../shared/data)
endif
endif

.PHONY: book test lint format clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10 or newer is needed"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[book,test]"
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build book -W -n --keep-going

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest tests
	DIFFUSION_LIB_SMOKE=1 $(BIN)/python -m pytest --nbval-lax book/chapters

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf book/_build .pytest_cache
