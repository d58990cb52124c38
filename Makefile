# Set-up and everyday commands. Each target installs what it needs into .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
comma := ,
# torch is pinned in constraints.txt (the CPU build on this machine's disk); it must be installed first.
# requirements.lock: the versions `make test` was last run with (make lock), so a fresh machine gets what was tested.
PIP := $(BIN)/pip install --quiet --constraint constraints.txt --constraint requirements.lock

.PHONY: build test bench clean tensorrt-api lock check-newest check-minimum

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt requirements.lock | $(BIN)/python
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

# The Triton server's own environment (utrexport serve makes it once; tests/test_serving.py runs a real tritonserver).
export UTREXPORT_SERVER_ENV := $(CURDIR)/.cache/triton-server
$(UTREXPORT_SERVER_ENV)/ready: | $(VENV)/.installed
	$(BIN)/utrexport serve --setup

test: $(VENV)/.installed $(NODE_MODULES) $(UTREXPORT_SERVER_ENV)/ready
	$(BIN)/python -m pytest

# The TensorRT stand-in the tests use, against the real Python bindings of each supported TensorRT and cuda-python
# (tests/test_tensorrt_api.py). Not part of `make test`: it downloads about 60 MB of wheels and needs a C compiler.
TRT_API := .cache/tensorrt-api
TRT_BINDINGS := tensorrt_cu12_bindings==10.0.1 tensorrt_cu12_bindings==10.3.0 tensorrt_cu12_bindings==10.14.1.48.post1 tensorrt_cu12_bindings==10.16.1.11 \
	tensorrt_cu13_bindings==11.4.0.106
CUDA_PYTHON := cuda-python==12.6.0 cuda-bindings==12.9.10 cuda-bindings==13.5.0
tensorrt-api: $(VENV)/.installed
	mkdir -p $(TRT_API)/stub
	for major in 10 11; do for lib in nvinfer nvonnxparser nvinfer_plugin; do \
	  cc -shared -fPIC -Wl,-soname,lib$$lib.so.$$major -o $(TRT_API)/stub/lib$$lib.so.$$major tests/tensorrt_api/stub.c || exit 1; \
	done; done
	for req in $(TRT_BINDINGS); do dir=$(TRT_API)/$$(echo $$req | sed 's/==/-/'); \
	  [ -d $$dir ] || $(BIN)/pip install --quiet --no-deps --target $$dir $$req || exit 1; done
	for req in $(CUDA_PYTHON); do dir=$(TRT_API)/$$(echo $$req | sed 's/==/-/'); \
	  [ -d $$dir ] || $(BIN)/pip install --quiet --target $$dir $$req || exit 1; done
	UTR_TENSORRT_API=$(TRT_API) $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_tensorrt_api.py

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/tokenizer.py

clean:
	rm -rf $(VENV) clients/node/node_modules bundles .pytest_cache .hypothesis *.egg-info build dist .cache

# Dependency drift. check-newest: the newest versions the extras allow; check-minimum: the lowest versions pyproject.toml
# declares (tests/smoke/minimums.py); each in a fresh environment, installed from a wheel of this tree, then every
# command once (tests/smoke/commands.sh). CI runs both after the tests. torch stays the pinned CPU build in both.
SMOKE_EXTRAS := export,onnxruntime,openvino,parquet,serve,genome
check-newest check-minimum: check-%:
	rm -rf .cache/venv-$*
	$(PYTHON) -m venv .cache/venv-$*
	.cache/venv-$*/bin/pip install --quiet --upgrade pip
	.cache/venv-$*/bin/pip install --quiet --constraint constraints.txt torch==2.13.0
	$(PYTHON) tests/smoke/minimums.py $(subst $(comma), ,$(SMOKE_EXTRAS)) > .cache/minimums.txt
	.cache/venv-$*/bin/pip install --quiet --constraint constraints.txt $(if $(filter minimum,$*),--constraint .cache/minimums.txt) '.[$(SMOKE_EXTRAS)]'
	.cache/venv-$*/bin/pip list --format=freeze > .cache/venv-$*.versions.txt
	tests/smoke/commands.sh .cache/venv-$*/bin

# Refresh requirements.lock: the newest versions the test extras allow, in a fresh environment. Run make test after
# it, and commit the lock with the change that needed it.
lock:
	rm -rf .cache/venv-lock
	$(PYTHON) -m venv .cache/venv-lock
	.cache/venv-lock/bin/pip install --quiet --upgrade pip
	.cache/venv-lock/bin/pip install --quiet --constraint constraints.txt torch==2.13.0
	.cache/venv-lock/bin/pip install --quiet --constraint constraints.txt '.[test]'
	{ echo "# The versions make test installs (Linux x86_64, CPython 3.11): make lock rewrites this file."; \
	  .cache/venv-lock/bin/pip freeze --exclude-editable | grep -v -i '^utrexport[ =@]' | sed 's/+cpu$$//'; } > requirements.lock
