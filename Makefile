# Set-up and the two commands of the README. PYTHON picks the interpreter that creates the venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint results clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: on CPU machines this is the CPU build; an unpinned torch pulled in by
	# another package would be a several-GB CUDA build.
	$(BIN)/pip install "torch==2.13.0"

install: $(BIN)/python
	$(BIN)/pip install -e ".[dev]"

# The quickstart: LSP-Zero beside GRPO on data prompts and continued SFT (about 2 minutes on 2 CPU cores).
demo: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TQDM_DISABLE=1 $(BIN)/sparring experiment configs/experiments/lsp-quick.yaml

test: install
	$(BIN)/ruff check src tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The proving-ground experiments behind docs/RESULTS.md, one after the other (each resumable: a rerun
# recomputes nothing that is on disk and rewrites its own section of docs/RESULTS.md).
EXPERIMENTS ?= distribution plateau lsp
results: install
	for e in $(EXPERIMENTS); do \
	  HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TQDM_DISABLE=1 $(BIN)/sparring experiment configs/experiments/$$e.yaml || exit 1; \
	done

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf runs build dist src/*.egg-info
