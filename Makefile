# qkernels: one place for every set-up step. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-stamp

.PHONY: install deps build build-cpu test test-fast test-cuda-emu demo bench sass-report clean

install: build

deps: $(STAMP)

# Dependencies are reinstalled only when requirements.txt changes.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# flock: helpers and editors may build at the same time; ninja skips what is up to date.
build: deps
	flock .build.lock $(PY) setup.py --quiet build_ext --inplace

build-cpu: deps
	QKERNELS_CPU_ONLY=1 flock .build.lock $(PY) setup.py --quiet build_ext --inplace

test: install
	$(PY) -m pytest -q tests

# csrc/cuda/*.cu run on the CPU under the project's CUDA emulator (tests/cuda_emu), against the CPU
# kernels; `make test` runs these too. The emulated build is cached under build/cuda_emu/.
test-cuda-emu: install
	$(PY) -m pytest -q tests/cuda_emu

test-fast: build-cpu
	$(PY) -m pytest -q -x tests

demo: install
	$(PY) -m ssd.demo --out demo

# Registers, shared/local memory and the SASS instruction mix of every CUDA kernel, from the built
# extension (no GPU needed): benchmarks/results/sass-sm_90.md and .json.
sass-report: install
	$(PY) -m benchmarks.sass_report

bench: install
	$(PY) -m benchmarks.run_all

clean:
	rm -rf build qkernels/*.so *.egg-info
