# The README's two commands: `make quickstart` (the main job) and `make test` (the test suite).
# Each one sets itself up on a fresh machine: a virtual environment in .venv with torch (a CUDA
# build, so the CUDA kernels compile and link even without a GPU), then kdfast built in place.
# The extension is rebuilt whenever a C++/CUDA source or the build files change.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
JOBS := $(shell nproc 2>/dev/null || echo 2)
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: quickstart demo test bench

quickstart: $(VENV)/.built
	$(BIN)/kdfast quickstart

demo: $(VENV)/.built
	$(BIN)/kdfast demo

test: $(VENV)/.built
	$(BIN)/python -m pytest

bench: $(VENV)/.built
	$(BIN)/python -m benchmarks.run

# Build requirements first: the editable build runs without isolation against this torch.
$(VENV)/.requirements:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch torchvision ninja pybind11 numpy setuptools wheel
	touch $@

$(VENV)/.built: $(VENV)/.requirements $(BUILD_INPUTS)
	MAX_JOBS=$(JOBS) $(BIN)/pip install --no-build-isolation -e ".[test]"
	touch $@
