# desanet: the two commands a newcomer needs, as root, are `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV    := .venv
PY      := $(VENV)/bin/python
PYTEST  := $(PY) -m pytest
STAMP   := $(VENV)/.desanet-installed

# Debian names its kernel packages (linux-headers-F, linux-image-F) by flavour: the
# architecture itself, except on armhf, whose multiplatform flavour is armmp.
DEB_ARCH       := $(shell dpkg --print-architecture 2>/dev/null)
KERNEL_FLAVOUR := $(if $(filter armhf,$(DEB_ARCH)),armmp,$(filter amd64 arm64 riscv64,$(DEB_ARCH)))
# The VM tier boots Debian's amd64 kernel under qemu-system-x86: x86-64 hosts only.
VM_TIER        := $(filter amd64,$(DEB_ARCH))
VM_PACKAGES    := linux-image-amd64 qemu-system-x86 busybox-static

# Debian packages the gateway and the test tiers need.
DEB_PACKAGES := python3-bpfcc bpfcc-tools linux-headers-$(KERNEL_FLAVOUR) python3-venv python3-dev \
	iproute2 iputils-ping procps nftables iperf3 ethtool build-essential postgresql \
	freeradius freeradius-postgresql freeradius-utils chromium nats-server \
	$(if $(VM_TIER),$(VM_PACKAGES))

.PHONY: setup deb-packages venv build lint test test-unit test-kernel test-vm test-wheel \
	bench bench-quick bench-quick-checkout demo clean

setup: deb-packages venv build

deb-packages:
	bash gateway/setup-host.sh --arch "$(DEB_ARCH)" --kernel-flavour "$(KERNEL_FLAVOUR)" \
		$(DEB_PACKAGES)

$(VENV)/bin/python:
	/usr/bin/python3 -m venv --system-site-packages $(VENV)

# pip runs only when setup.py changed since the last install: a second `make setup` is quick.
$(STAMP): setup.py pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet --upgrade "pip>=23" "setuptools>=61" wheel "cython>=3.0,<4" "numpy>=1.24,<3" "babel>=2.12,<3"
	$(PY) -m pip install --quiet --no-build-isolation -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

build: $(STAMP)
	$(PY) setup.py --quiet build_ext --inplace
	$(VENV)/bin/pybabel --quiet compile -d gateway/console/translations

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# pytest exits 5 when it collects nothing: every tier here must run tests, so that is a failure.
define run_pytest
	rc=0; $(PYTEST) --durations=10 $(1) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: no tests collected in $(1)" >&2; exit 1; fi; exit $$rc
endef

test-unit: setup
	$(call run_pytest,tests/unit -m unit)

test-kernel: setup
	$(call run_pytest,tests/kernel -m kernel)

test-vm: setup
ifeq ($(VM_TIER),)
	@echo "test-vm: skipped: the VM tier boots Debian's amd64 kernel under qemu-system-x86," \
		"so it runs on x86-64 (amd64) hosts only; this one is $(DEB_ARCH)"
else
	$(PY) -m tests.vm.run
endif

# The wheel a user installs, in a fresh venv, used from outside the checkout (tests/wheel/run.py).
test-wheel: setup
	$(PY) -m tests.wheel.run

# `desanet bench` runs every benchmarks/*.py module (or those named) and fails if any failed.
bench-quick: setup
	$(VENV)/bin/desanet bench --quick --out /tmp/desanet-bench

# `make test` runs each benchmark's quick run once: test-wheel runs every one an installed
# wheel can run, from the wheel; these need the checkout (its harnesses, the console extra).
CHECKOUT_BENCHMARKS := console fleet

bench-quick-checkout: setup
	$(VENV)/bin/desanet bench --quick --out /tmp/desanet-bench $(CHECKOUT_BENCHMARKS)

test: setup lint test-unit test-kernel test-vm test-wheel bench-quick-checkout

bench: setup
	$(VENV)/bin/desanet bench --out bench-results

demo: setup
	$(VENV)/bin/desanet demo

clean:
	rm -rf build *.egg-info cython_ext/*.c cython_ext/*.so .mypy_cache .ruff_cache .pytest_cache
