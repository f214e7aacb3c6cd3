# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv once and reuse it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean

venv: $(STAMP)

# torch is pinned in pyproject.toml and installed in the same pip command as everything else,
# so pip takes the CPU wheel instead of resolving a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/valr demo

lint: $(STAMP)
	$(BIN)/ruff check valr tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
