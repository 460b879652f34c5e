# vhost-pv: `make demo` and `make test` do all set-up on a fresh Debian machine.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
NATIVE := vhost_pv/_vhost_pv_native.cpython-311-x86_64-linux-gnu.so
CACHE ?= $(or $(VHOST_PV_CACHE),$(HOME)/.cache/vhost-pv)
FUZZ_SEED ?= 1
FUZZ_DURATION ?= 60
FUZZ_SKIP ?=
# The C tests and the fuzz round, again against the ASan + UBSan build (build/asan/), whose
# workers run under the seccomp filter too (the last two: it is installed and it kills).
SANITIZED_TESTS := tests/unit/test_ring.py tests/daemon/test_protocol.py tests/daemon/test_fuzz.py \
	tests/unit/test_seccomp_filter.py tests/daemon/test_seccomp_workers.py

.PHONY: install deps venv native guest demo test lint unit bench fuzz asan clean

install: deps venv native

deps:
	./scripts/install-deps.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip==25.1.1
	$(VPY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

native: venv
	$(VPY) build.py

guest: install
	VHOST_PV_CACHE=$(CACHE) ./scripts/build-guest.sh

demo: guest
	VHOST_PV_CACHE=$(CACHE) $(VENV)/bin/vhost-pv demo

lint: install
	$(VENV)/bin/ruff check vhost_pv vhost_pv_tools tests bench fuzz build.py
	$(VENV)/bin/mypy

test: guest lint
	VHOST_PV_CACHE=$(CACHE) $(VPY) -m pytest -q tests
	$(MAKE) asan

# The in-process tests only (tests/unit, marker `unit`): no daemon, no QEMU, no engine.
unit: install
	$(VPY) -m pytest -q -m unit tests

# A seeded, time-bounded fuzz of the vhost-user socket and the rings (python -m fuzz --help).
fuzz: install
	$(VPY) -m fuzz --seed $(FUZZ_SEED) --duration $(FUZZ_DURATION) $(if $(FUZZ_SKIP),--skip $(FUZZ_SKIP))

# The C data path built with -fsanitize=address,undefined; any sanitizer report fails the run.
asan: install
	$(VPY) build.py --sanitize
	./scripts/run-sanitized.sh $(VPY) -m pytest -q -p no:cacheprovider $(SANITIZED_TESTS)

bench: guest
	VHOST_PV_CACHE=$(CACHE) $(VPY) -m bench

clean:
	rm -rf $(VENV) build vhost_pv/_vhost_pv_native*.so vhost_pv/_vhost_pv_native.c \
		vhost_pv_tools/loadgen/_loadgen_native*.so vhost_pv_tools/loadgen/_loadgen_native.c
