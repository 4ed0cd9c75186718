# `make demo` and `make test` bootstrap .venv on first use.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
TRITON  ?= triton==3.7.1
NATIVE  := build/native/libucseg_native.so

.PHONY: demo test bench native clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH)" "$(TRITON)"
	$(VPY) -m pip install -q -e ".[test,triton,nifti,plot,telemetry,dali]"
	$(VPY) -m pip install -q --no-deps "medpy>=0.5"
	touch $(STAMP)

# The native library is optional: built when cmake and nvcc exist, skipped (tests say why) otherwise.
# A failed build (tools present) fails the target; missing tools only skip it.
native:
	@if command -v cmake >/dev/null && command -v nvcc >/dev/null; then \
	  cmake -S . -B build/native -DCMAKE_BUILD_TYPE=Release >/dev/null && \
	  cmake --build build/native -j2 >/dev/null && echo "native library built: $(NATIVE)"; \
	else echo "native library not built (needs cmake and nvcc); Python falls back to torch/scipy"; fi

test: $(STAMP) native
	$(VPY) -m pytest -q tests
	$(VPY) -m pytest -q benchmarks --benchmark-disable
	@if [ -f $(NATIVE) ]; then ctest --test-dir build/native --output-on-failure; \
	else echo "ctest skipped: native library not built"; fi

# The demo trains on $(ACDC) when it holds an SSL4MIS ACDC set, else on synthetic data
# (written to runs/synthetic_acdc); the run goes to runs/demo.
ACDC    ?= data/ACDC
demo: $(STAMP)
	$(VPY) -m ucseg_fast.cli demo $(if $(wildcard $(ACDC)/train_slices.list),--data.root='$(ACDC)')

bench: $(STAMP)
	$(VPY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build runs .pytest_cache
