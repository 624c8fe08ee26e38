# The two commands of the README: `make bench` (the benchmark report) and `make test`.
# Both set everything up on a fresh machine first: a virtualenv in .venv, the pinned dev
# requirements, and mtlfast installed editable with its native module built (CMake + ninja).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mtlfast-installed
NATIVE_SOURCES := $(shell find csrc -type f) CMakeLists.txt setup.py pyproject.toml

.PHONY: setup test test-fast bench info gpu-check clean

setup: $(STAMP)

$(STAMP): requirements-dev.txt requirements-thirdparty.txt $(NATIVE_SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-thirdparty.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

test: setup
	$(BIN)/python -m pytest tests

# The inner loop: everything but the tests tests/conftest.py marks slow (AOT compilation, the CUDA
# emulation, the examples, subprocesses, large samples); under 3 minutes on a 2-core CPU machine.
test-fast: setup
	$(BIN)/python -m pytest tests -m "not slow"

bench: setup
	$(BIN)/python -m bench

info: setup
	$(BIN)/python -m mtlfast.info

# The GPU session in one command (bench/gpu_check.py says what each stage does): on a GPU machine
# with the machine's own python3 (no venv, no network; deliberately no `setup`), mtlfast._C built
# for the present GPU only, then info, the GPU test tier, compute-sanitizer, the benchmark and the
# profiles, each under its own time limit, 6 minutes in all on an H100 / H200; at most 8 files in
# OUT (default: $OUT, else bench/out/gpu-check). Without a GPU the same command is a dry run on the
# CPU (tiny sizes, under 3 minutes). ARGS passes options, e.g. ARGS="--stages bench,profile".
gpu-check:
	$(PYTHON) -m bench.gpu_check $(if $(OUT),--out "$(OUT)") $(ARGS)

clean:
	rm -rf build $(VENV) mtlfast/_C*.so bench/out
