# handoffd: all set-up happens here, so a fresh machine needs only `make demo` or `make test`.
# The supervisor runs the acceptor and the workers under uids of their own, which must be
# able to execute the venv's interpreter: a python under /root (pyenv) is out of their
# reach, so the venv is made from the system's python3.11 where there is one.
PYTHON ?= $(firstword $(wildcard /usr/bin/python3.11) python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
TEST_STAMP := $(VENV)/.test-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
KRB5_STAMP := $(VENV)/.krb5-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: all venv venv-test venv-krb5 demo test test-lsm lint typecheck unit bench bench-micro soak fuzz clean

all: test

# The runtime alone (what `make demo` needs: trio, cryptography, pyOpenSSL).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	rm -f $(VENV)/.installed-* $(VENV)/.test-* $(VENV)/.krb5-*
	touch $@

venv: $(STAMP)

# The test extras (pytest, mypy, ruff, ...) on top, for the suites.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

venv-test: $(TEST_STAMP)

# The suite also needs the krb5 extra; its gssapi builds against MIT's headers
# (deps-krb5) when no wheel fits.  `make demo` does not need any of it.
$(KRB5_STAMP): $(TEST_STAMP) | deps-krb5
	$(BIN)/python -m pip install --quiet -e '.[test,krb5]'
	touch $@

venv-krb5: $(KRB5_STAMP)

# systemd-analyze, systemd-socket-activate and systemd-sysusers for the systemd tests
# (Debian's systemd package); a no-op when they are already installed.
.PHONY: deps-debian
deps-debian:
	@command -v systemd-analyze >/dev/null && command -v systemd-socket-activate >/dev/null \
	  || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	       $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends systemd; }

# MIT krb5 for the Kerberos mechanism and its tests (tests/test_krb5.py runs a real KDC
# with k5test): headers and krb5-config for building gssapi, krb5kdc and kadmin.local for
# the throwaway realm, kinit/klist; a no-op when they are already installed.
.PHONY: deps-krb5
deps-krb5:
	@command -v krb5-config >/dev/null && { command -v krb5kdc || test -x /usr/sbin/krb5kdc; } \
	  >/dev/null && { command -v kadmin.local || test -x /usr/sbin/kadmin.local; } >/dev/null \
	  && command -v kinit >/dev/null && command -v gcc >/dev/null \
	  || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	       $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	         apt-get install -y --no-install-recommends \
	         libkrb5-dev krb5-kdc krb5-admin-server krb5-user gcc; }

# promtool for tests/test_metrics_exposition.py, which checks the metrics endpoint with
# `promtool check metrics` (skipped, saying so, without it); Debian's prometheus package
# (promtool is all it is installed for: on a host running systemd its postinst also
# starts the Prometheus server, on :9090).  Not a prerequisite of `make test`; .ci/run
# runs it first.  A no-op when promtool is installed.
.PHONY: deps-prometheus
deps-prometheus:
	@command -v promtool >/dev/null \
	  || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	       $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	         apt-get install -y --no-install-recommends prometheus; }

# Chromium and curl for the TLS tests with real clients (tests/test_tls_browser.py loads a
# page headless and checks its screenshot; skipped, saying so, without Chromium); Debian's
# chromium package.  Not a prerequisite of `make test`; .ci/run runs it first.  A no-op
# when both are installed.
.PHONY: deps-chromium
deps-chromium:
	@{ command -v chromium >/dev/null && command -v curl >/dev/null; } \
	  || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	       $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	         apt-get install -y --no-install-recommends chromium curl; }

lint: venv-krb5
	$(BIN)/ruff check handoffd tests examples

typecheck: venv-krb5
	$(BIN)/mypy --strict handoffd

unit: venv-krb5 deps-debian
	$(BIN)/pytest

test: lint typecheck unit

# SO_PEERSEC against real SELinux labels: boots a qemu guest (see lsm/run.sh, docs/LSM.md).
# Then the kTLS cases again on a kernel that can rekey TLS 1.3 (Linux >= 6.14; Debian's
# trixie-backports kernel, verified against Debian's archive keyring): KeyUpdate in the kernel.
KTLS_REKEY_MODULES = netfs 9pnet 9pnet_virtio 9p gf128mul ctr gcm libchacha chacha \
	libpoly1305 chacha20poly1305 tls
test-lsm: venv-test
	lsm/run.sh
	LSM_KERNEL_SUITE=trixie-backports LSM_MODULES="$(KTLS_REKEY_MODULES)" \
	    LSM_PYTEST_ARGS=-k,ktls LSM_MIN_CASES=12 lsm/run.sh

# README's systemd install block, then DEPLOY.md's walk-through, each run verbatim as root
# in a booted Debian 12 container (systemd-nspawn; docs/SYSTEMD-TEST.md): units, sysusers,
# tmpfiles, config, key, enable, clients through reload, restart and SIGUSR2, socket
# activation, stop, reboot.  Installs systemd-container and debootstrap if missing; the
# root file system is cached in .systemd-test/.  ~90 s once cached (HANDOFFD_SYSTEMD_TIMEOUT
# bounds it).
.PHONY: test-systemd
test-systemd: venv
	$(BIN)/python systemd/test/run.py

# The shipped Docker image (Dockerfile, docker/) built and run with a real engine, the
# ways README and docs/DEPLOY.md show (see docs/DOCKER-TEST.md): installs Debian's
# docker.io and debootstrap if missing, starts dockerd if none runs, builds a stand-in
# base image when no registry is reachable (cached).  2 to 4 minutes (docs/DOCKER-TEST.md).
.PHONY: test-docker
test-docker: venv
	$(BIN)/python docker/test/run.py

demo: venv
	$(BIN)/python -m examples.echo.demo

# HTTPS through handoffd: a throwaway CA, a [tls] listener, curl against 4 workers that
# never hold the TLS key (examples/https/demo.py, README "HTTPS for curl and browsers").
.PHONY: demo-https
demo-https: venv
	$(BIN)/python -m examples.https.demo

# handoffd against its alternatives (docs/BENCHMARKS.md); not part of `make test`.
# Writes bench/results/latest.json and latest.png, prints the table (~7 min on 2 cores;
# bench/acceptors.py, [server] acceptors 1 against 2, is ~2.5 of them).
bench: venv
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.run

# Only the per-operation costs of the pure core (bench/micro.py, a few seconds; also in `make bench`).
bench-micro: venv
	$(BIN)/python -m bench.micro

# >= 100,000 connections through the echo demo (4 workers) with worker SIGKILLs and a
# SIGHUP roll; not part of `make test`.  Writes soak/results/latest.json (docs/SOAK.md).
SOAK_SECONDS ?= 600
soak: venv
	SOAK_SECONDS=$(SOAK_SECONDS) $(BIN)/python -m soak.run

# Coverage-guided fuzzing of every parser (atheris); not part of `make test`.
# FUZZ_SECONDS per target; crashes land in fuzz/artifacts/ (see fuzz/README.md).
FUZZ_SECONDS ?= 60
fuzz: venv
	$(BIN)/python -c 'import atheris' 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[fuzz]'
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python fuzz/run.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
