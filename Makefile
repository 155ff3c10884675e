# kvmlab: `make lab up && make conformance` runs the lab and the suite; `make test` sets up and runs our tests.
SHELL := /bin/bash
.DEFAULT_GOAL := help

LAB ?= labs/default.yaml
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
CONFORMANCE_WORKERS ?= 4

# Debian packages: what `lab up` needs on the hypervisor host, and what our tests need on top.
APT_RUNTIME := libvirt-daemon-system libvirt-clients libvirt-dev pkg-config gcc python3-dev python3-venv \
               qemu-system-x86 qemu-utils dnsmasq-base iptables openssh-client e2fsprogs
APT_TEST := $(APT_RUNTIME) libxml2-utils cloud-init mmdebstrap e2fsprogs nftables conntrack iproute2 \
            wrk tcpdump ethtool procps containerd shellcheck umoci skopeo
# The offline bundle from source: Go 1.26 (golang.org toolchain, not Debian's) plus these.
APT_BUNDLE := mmdebstrap umoci skopeo ca-certificates

# `make lab WORDS...`: the words after `lab` are passed to the CLI, e.g. `make lab up`, `make lab ssh cp1`.
ifeq (lab,$(firstword $(MAKECMDGOALS)))
  LAB_ARGS := $(wordlist 2,$(words $(MAKECMDGOALS)),$(MAKECMDGOALS))
  ifneq ($(LAB_ARGS),)
    $(eval $(LAB_ARGS):;@:)
  endif
endif

.PHONY: help lab deps sysdeps sysdeps-test venv image bundle libvirtd conformance test test-cluster test-cluster-smoke test-cluster-faults test-unit test-e2e bench nightly clean

help:
	@echo "make lab up|down|status|render|ssh NODE|logs  (LAB=$(LAB))"
	@echo "make conformance   run the conformance suite against the lab's kubeconfig"
	@echo "make test          install test dependencies, build the offline image, run every test"
	@echo "make image         build the offline Debian test image into the cache"
	@echo "make bundle        build the offline Kubernetes/Cilium/MetalLB bundle (FROM=release to fetch)"
	@echo "make test-cluster  the real-cluster tier: lab up from the bundle in TCG VMs + conformance against it"
	@echo "make test-cluster-smoke  its smoke run: lab up, cluster checks, the conformance checks that identify the cluster"
	@echo "make test-cluster-faults  the same, then faults injected into that cluster at their own layer"
	@echo "make deps          system packages and the virtualenv"

lab: deps libvirtd
	@if [ -z "$(firstword $(LAB_ARGS))" ]; then echo "usage: make lab up|down|status|render|ssh NODE|logs"; exit 2; fi
	$(VENV)/bin/lab $(firstword $(LAB_ARGS)) -c $(LAB) $(wordlist 2,$(words $(LAB_ARGS)),$(LAB_ARGS)) \
	  $(if $(filter render,$(firstword $(LAB_ARGS))),-o $(or $(OUT),rendered/$(notdir $(basename $(LAB)))))

deps: sysdeps venv

# Installs only what is missing, so a rerun is quick.
# Without KVM, on Debian 12: QEMU and libvirt from bookworm-backports (multi-vCPU TCG guests hang on QEMU < 8.1).
sysdeps:
	@bash scripts/apt-ensure.sh $(APT_RUNTIME)
	@bash scripts/qemu-tcg.sh

sysdeps-test:
	@bash scripts/apt-ensure.sh $(APT_TEST)
	@bash scripts/qemu-tcg.sh

venv: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

# A libvirtd for `lab up` on this host: the system service where systemd runs, else the daemons directly.
libvirtd:
	@bash scripts/ensure-libvirtd.sh

image: sysdeps-test
	bash images/offline/build.sh

# The offline bundle (Kubernetes, Cilium, MetalLB, probe image), cached by recipe hash in ~/.cache/kvmlab/bundles.
# FROM=release fetches official artefacts instead of building (a host with internet).
bundle: venv
	@bash scripts/apt-ensure.sh $(APT_BUNDLE)
	@command -v go >/dev/null || { echo "bundle: Go 1.26 is needed to build from source (https://go.dev/dl)"; exit 2; }
	$(VENV)/bin/lab bundle build --from $(or $(FROM),source)

# Against the lab's kubeconfig (.lab/<name>/kubeconfig) by default; KUBECONFIG or --kubeconfig for any cluster.
# Two stages: every check but the disruptive ones in parallel, then the disruptive ones (NoExecute taints evict other
# checks' pods) alone and serially, adding to the same report. The second stage runs even if the first failed.
conformance: venv
	@mkdir -p results
	rc=0; $(PY) -m pytest conformance --lab $(LAB) -m 'not disruptive' -n $(CONFORMANCE_WORKERS) --dist loadgroup -o timeout=1800 \
	  --junitxml results/junit.xml $(PYTEST_ARGS) || rc=$$?; \
	rm -f results/junit-disruptive.xml; \
	$(PY) -m pytest conformance --lab $(LAB) -m disruptive --append-report -o timeout=1800 \
	  --junitxml results/junit-disruptive.xml $(PYTEST_ARGS) || { r=$$?; \
	  if [ $$r -eq 5 ] && [[ " $(PYTEST_ARGS) " == *" -k "* ]]; then echo "conformance: -k selected no disruptive check"; \
	  else rc=$$((rc ? rc : r)); fi; }; exit $$rc

# Everything our tests need, then every test: unit, libvirt test driver, real kernel netns, real VMs (TCG).
test: sysdeps-test venv image
	bash scripts/libvirtd-netns.sh start
	bash scripts/run-tests.sh $(PYTEST_ARGS)

# The real-cluster tier: Kubernetes + Cilium + MetalLB from the offline bundle in TCG VMs, then the conformance
# suite against it. Builds the bundle first when it is not cached (26-40 minutes from cold on 2 cores, docs/bundle.md).
test-cluster: sysdeps-test venv image bundle
	bash scripts/libvirtd-netns.sh start
	bash scripts/run-tests.sh --cluster -m 'not faults and not subset' $(PYTEST_ARGS)

# Its smoke run (`.ci/run` with KVMLAB_CLUSTER_TIER=smoke): the same `lab up` and cluster checks, a second no-op up,
# and `make conformance` narrowed to the checks that identify the cluster (tests/cluster, marker smoke).
test-cluster-smoke: sysdeps-test venv image bundle
	bash scripts/libvirtd-netns.sh start
	bash scripts/run-tests.sh --cluster -m 'smoke and not faults' $(PYTEST_ARGS)

# The same cluster, then every fault brought into it at its own layer (each restores health afterwards).
test-cluster-faults: sysdeps-test venv image bundle
	bash scripts/libvirtd-netns.sh start
	bash scripts/run-tests.sh --cluster -m 'not subset' $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest tests/unit tests/libvirt tests/conformance -q $(PYTEST_ARGS)

bench: venv
	$(PY) bench/provision.py
	$(PY) bench/probes.py

nightly: deps libvirtd
	bash scripts/nightly.sh $(LAB)

clean:
	rm -rf $(VENV) rendered results .pytest_cache
