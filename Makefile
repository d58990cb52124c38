# Set-up and everyday commands. Each target installs what it needs into .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned in constraints.txt (the CPU build on this machine's disk); it must be installed first.
PIP := $(BIN)/pip install --quiet --constraint constraints.txt

.PHONY: build test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $@

# The main job, offline: a full-size k=6 bundle with seeded random weights (no model hub needed).
build: $(VENV)/.installed
	$(BIN)/utrexport build --kmer 6 --random-init --seed 0 --output bundles/utrbert-6mer-random --force

# The Node.js client's packages (tests/test_contract.py runs it). CUDA=skip: onnxruntime-node would otherwise try to
# download CUDA libraries at install time.
NODE_MODULES := clients/node/node_modules/.package-lock.json
$(NODE_MODULES): clients/node/package.json clients/node/package-lock.json
	cd clients/node && ONNXRUNTIME_NODE_INSTALL_CUDA=skip npm ci --no-audit --no-fund --loglevel=error

test: $(VENV)/.installed $(NODE_MODULES)
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/tokenizer.py

clean:
	rm -rf $(VENV) clients/node/node_modules bundles .pytest_cache .hypothesis *.egg-info build dist
