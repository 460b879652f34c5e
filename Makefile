# vhost-pv: `make demo` and `make test` do all set-up on a fresh Debian machine.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
NATIVE := vhost_pv/_vhost_pv_native.cpython-311-x86_64-linux-gnu.so
CACHE ?= $(or $(VHOST_PV_CACHE),$(HOME)/.cache/vhost-pv)

.PHONY: install deps venv native guest demo test lint unit bench clean

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
	$(VENV)/bin/ruff check vhost_pv tests bench build.py
	$(VENV)/bin/mypy

test: guest lint
	VHOST_PV_CACHE=$(CACHE) $(VPY) -m pytest -q tests

bench: guest
	VHOST_PV_CACHE=$(CACHE) $(VPY) -m bench

clean:
	rm -rf $(VENV) build vhost_pv/_vhost_pv_native*.so vhost_pv/_vhost_pv_native.c
