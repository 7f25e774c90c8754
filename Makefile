# Pumice: `make demo` and `make test` work on a fresh Debian 12 machine (run as root for apt).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PUMICE_CACHE ?= $(HOME)/.cache/pumice
export PUMICE_CACHE

# the real LAVA 2023.01, run beside Pumice for side-by-side checks (tests) and figures (bench);
# Pumice never imports it
LAVA_PACKAGES := lava-dispatcher
# the worker's NFS server, a client that tests it, the NFS-rootable DUTs' builder (debootstrap, a
# foreign-architecture second stage through binfmt_misc + qemu-user-static) and zstd rootfs archives
NFS_PACKAGES := nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils debootstrap qemu-user-static zstd
# the container engine the tests drive (podman with runc: crun cannot start containers on some VMs),
# debootstrap for the images' Debian base, docker-compose for its copy of the compose specification
CONTAINER_PACKAGES := podman runc catatonit debootstrap docker-compose
APT_PACKAGES := qemu-system-x86 qemu-system-arm qemu-utils ipxe-qemu busybox-static u-boot-qemu u-boot-tools \
	cpio xz-utils bzip2 gzip nginx-light ser2net telnet chromium git curl dpkg-dev iproute2 \
	python3-venv shellcheck $(CONTAINER_PACKAGES) $(NFS_PACKAGES) $(LAVA_PACKAGES)
#: podman reads this drop-in after the machine's own containers.conf (which stays untouched)
CONTAINERS_CONF_DROPIN := /etc/containers/containers.conf.d/50-pumice.conf
# only for make bench: LAVA's U-Boot jobs read tftpd-hpa's configuration for their TFTP root
BENCH_PACKAGES := tftpd-hpa
APT_INSTALL ?= $(APT_PACKAGES)

.PHONY: setup apt venv compile images containers-conf container-images test demo bench fuzz lint golden compat clean

setup: apt venv compile images containers-conf container-images

# apt packages, only when root and only what is missing (idempotent, quiet when all is there)
apt:
	@missing=$$(for p in $(APT_INSTALL); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing: $$missing"; \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
				--no-install-recommends $$missing; \
		else echo "missing Debian packages (run as root or install them): $$missing"; exit 1; fi; \
	fi

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[master,postgres,dev]' --config-settings editable_mode=compat
	touch $@

venv: $(VENV)/.installed

# byte-compile: imports stay fast even where PYTHONDONTWRITEBYTECODE is set
compile: venv
	$(PY) -m compileall -q agent results master sitegen tools

# the boards' kernels and ramdisks, and their Debian NFS roots (debootstrap: minutes the first time,
# then a no-op); the larger root of make bench nfs: tools/build_dut_images.py --rootfs-bench
images: venv
	$(PY) tools/build_dut_images.py --cache $(PUMICE_CACHE) --rootfs

# podman's settings for this machine (runc, cgroupfs, no default ulimits), written only when they differ
containers-conf: apt
	@if ! cmp -s deploy/containers/containers.conf $(CONTAINERS_CONF_DROPIN); then \
		if [ "$$(id -u)" = 0 ]; then install -D -m 644 deploy/containers/containers.conf $(CONTAINERS_CONF_DROPIN) \
			&& echo "installed $(CONTAINERS_CONF_DROPIN)"; \
		else echo "podman needs $(CONTAINERS_CONF_DROPIN) (run as root, or copy deploy/containers/containers.conf)"; \
			exit 1; fi; \
	fi

# the test container images (Debian base, qemu, lava-test, mkbootimg), built once, cached; with
# PUMICE_IMAGES=1 also Pumice's agent and master images (the tests build those themselves)
container-images: venv containers-conf
	$(PY) tools/build_container_images.py --cache $(PUMICE_CACHE) $(if $(PUMICE_IMAGES),--pumice)

test: setup
	$(PY) -m pytest -q -ra tests

demo: setup
	$(PY) tools/demo.py

bench: setup
	@$(MAKE) --no-print-directory apt APT_INSTALL="$(BENCH_PACKAGES)"
	$(PY) tools/bench.py $(AREAS)

# property-based tests of hostile input with many more examples than make test runs (FUZZ_EXAMPLES)
FUZZ_EXAMPLES ?= 2000
fuzz: setup
	PUMICE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -ra -p no:cacheprovider --timeout 7200 \
		tests/test_fuzz_submission.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check . || true

golden: venv
	PUMICE_GOLDEN=update $(PY) -m pytest -q tests -k golden

# the side-by-side validation suite's data (tests/data/compat): collect the jobs with the pinned
# generators (in a tools venv of their own), render their devices with LAVA's templates, record
# lava-run --validate's verdicts (takes minutes), then the report. KernelCI's jobs are rendered
# again only when KERNELCI_CORE and KERNELCI_PIPELINE name checkouts (or git directories) of
# kernelci-core and kernelci-pipeline; otherwise the stored ones are kept.
COMPAT_VENV ?= .compat-venv
COMPAT_GENERATORS := lava-test-plans==3.2.0 tuxlava==0.28.0 jinja2==3.1.6 pyyaml==6.0.4
compat: apt venv
	test -x $(COMPAT_VENV)/bin/python || python3 -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q $(COMPAT_GENERATORS)
	COMPAT_VENV=$(COMPAT_VENV) $(COMPAT_VENV)/bin/python tools/compat_collect.py
	$(PY) tools/compat_lava.py devices
	$(PY) tools/compat_lava.py goldens
	$(PY) tools/compat_report.py

clean:
	rm -rf $(VENV) build *.egg-info
