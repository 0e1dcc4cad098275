# The README's two commands: `make quickstart` (the main job) and `make test` (the test suite).
# Each one sets itself up on a fresh machine: a virtual environment in .venv with torch (a CUDA
# build, so the CUDA kernels compile and link even without a GPU), then kdfast built in place.
# The extension is rebuilt whenever a C++/CUDA source or the build files change.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
JOBS := $(shell nproc 2>/dev/null || echo 2)
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/emu/*.h csrc/emu/*.cpp) $(shell find csrc/emu/include -name "*.h")

.PHONY: quickstart demo test bench gpu-check gpu-data compile-check compile-check-triton36 wheel-check lint typecheck

quickstart: $(VENV)/.built
	$(BIN)/kdfast quickstart

demo: $(VENV)/.built
	$(BIN)/kdfast demo

test: $(VENV)/.built
	$(BIN)/python -m pytest

# ruff's lint and format check over the whole tree (pyproject.toml [tool.ruff]).
lint: $(VENV)/.built
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy over kdfast, kernels, benchmarks and tests (pyproject.toml [tool.mypy]).
typecheck: $(VENV)/.built
	$(BIN)/mypy

bench: $(VENV)/.built
	$(BIN)/python -m benchmarks.run

# The GPU compile check of every Triton specialisation (benchmarks/README.md), with the project's
# Triton (sm_90 and sm_80) and with triton 3.6.0 (the GPU machine's; sm_90) in a side venv with
# torch 2.13 (a CPU build) and numpy.
TRITON36 := .venv-triton36
compile-check: compile-check-triton36 $(VENV)/.built
	env -u TRITON_INTERPRET $(BIN)/python -m benchmarks.triton_compile

compile-check-triton36: $(TRITON36)/.built
	env -u TRITON_INTERPRET $(TRITON36)/bin/python -m benchmarks.triton_compile --arch sm90

$(TRITON36)/.built:
	$(PYTHON) -m venv $(TRITON36)
	$(TRITON36)/bin/pip install triton==3.6.0 torch==2.13.0 numpy
	touch $@

# kdfast as a user installs it: a wheel of the committed tree (CPU kernels only, to keep it short),
# installed into a folder outside the checkout and run from another folder with this venv's torch:
# the CLI's help and a one-step `kdfast bench --e2e`, which must not need benchmarks/.
WHEEL_CHECK := $(CURDIR)/.wheel-check
wheel-check: $(VENV)/.built
	rm -rf $(WHEEL_CHECK) && mkdir -p $(WHEEL_CHECK)/src $(WHEEL_CHECK)/run
	git archive HEAD | tar -x -C $(WHEEL_CHECK)/src
	cd $(WHEEL_CHECK)/src && KDFAST_SKIP_CUDA=1 KDFAST_SKIP_CUDA_EMU=1 MAX_JOBS=$(JOBS) \
		$(CURDIR)/$(BIN)/pip wheel -q --no-build-isolation --no-deps -w $(WHEEL_CHECK)/dist .
	$(BIN)/pip install -q --no-deps --target $(WHEEL_CHECK)/site $(WHEEL_CHECK)/dist/kdfast-*.whl
	cd $(WHEEL_CHECK)/run && PYTHONPATH=$(WHEEL_CHECK)/site $(CURDIR)/$(BIN)/python -c \
		"import kdfast, sys; assert kdfast.__file__.startswith('$(WHEEL_CHECK)/site/'), kdfast.__file__; print('kdfast from', kdfast.__file__)"
	cd $(WHEEL_CHECK)/run && PYTHONPATH=$(WHEEL_CHECK)/site $(CURDIR)/$(BIN)/python -m kdfast.cli bench --e2e --help > /dev/null
	cd $(WHEEL_CHECK)/run && PYTHONPATH=$(WHEEL_CHECK)/site $(CURDIR)/$(BIN)/python -m kdfast.cli bench --e2e --quick \
		--device cpu --methods kd --batch 2 --iters 1 --out e2e.csv
	test -s $(WHEEL_CHECK)/run/e2e.csv

# The prepared session of a lent GPU machine (benchmarks/README.md): its python3 holds torch, and
# the script builds kdfast itself. GPU_CHECK_ARGS, e.g. --stages ops e2e, or --dry-run (CPU).
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

# The CIFAR-10 subset that the session's real-data stage reads (.gpu-data/, git-ignored, carried).
gpu-data: $(VENV)/.built
	$(BIN)/python -m benchmarks.gpu_data

# Build requirements first: the editable build runs without isolation against this torch.
$(VENV)/.requirements:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch torchvision ninja pybind11 numpy setuptools wheel
	touch $@

$(VENV)/.built: $(VENV)/.requirements $(BUILD_INPUTS)
	MAX_JOBS=$(JOBS) $(BIN)/pip install --no-build-isolation -e ".[test]"
	touch $@
