# qkernels: one place for every set-up step. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-stamp
# .venv may be a symlink shared by several checkouts: whatever changes it holds this lock.
VENV_LOCK := flock $(VENV)/.install.lock
EDITABLE_STAMP := build/.editable-stamp
# Exit 0 when .venv's qkernels is an editable install of this checkout (-I: the checkout's own files
# must not answer for the venv).
EDITABLE_HERE := $(PY) -I -c 'import importlib.metadata as m, json, os, sys, urllib.parse as up; \
  u = json.loads(m.distribution("qkernels").read_text("direct_url.json") or "{}"); \
  here = os.path.realpath(up.unquote(up.urlparse(u.get("url", "")).path) or "/nonexistent"); \
  sys.exit(not (u.get("dir_info", {}).get("editable") and here == os.path.realpath(".")))'

.PHONY: install deps build build-cpu test test-release test-fast test-cuda-emu demo bench sass-report clean

# Editable install into .venv: `import qkernels`, `import ssd`, `python -m ssd.main_quant` and
# `qkernels-ssd` work from any folder. Redone only when .venv holds another checkout's (the last
# checkout to run `make install` wins; tests run from a checkout root import that checkout's own build)
# or the package metadata changed; pip's build reuses build/ (ninja), so it does not recompile.
install: build
	@if [ -f $(EDITABLE_STAMP) ] && [ -z "$$(find setup.py pyproject.toml qkernels/_version.py -newer $(EDITABLE_STAMP))" ] \
	    && $(EDITABLE_HERE) 2>/dev/null; then \
	  echo "qkernels: .venv already has this checkout installed (editable)"; \
	else \
	  echo "qkernels: installing this checkout into .venv (editable)"; \
	  $(VENV_LOCK) flock .build.lock $(PY) -m pip install --quiet --no-build-isolation --no-deps --no-index -e . \
	    && touch $(EDITABLE_STAMP); \
	fi

deps: $(STAMP)

# Dependencies are reinstalled only when requirements.txt changes.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_LOCK) $(PY) -m pip install --quiet --upgrade pip
	$(VENV_LOCK) $(PY) -m pip install --quiet -r requirements.txt
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

# Slow release checks beside `make test`: a CPU-only wheel compiled from the sdist alone.
test-release: install
	QKERNELS_TEST_SDIST_BUILD=1 $(PY) -m pytest -q tests/test_packaging.py

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
	rm -rf build qkernels/*.so qkernels/_build_info.json *.egg-info
