# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup services demo test test-all lint bench clean

setup: $(STAMP)

# Where torch 2.13.0 comes from. Empty (the default): as pip resolves `torch==2.13.0` from the package index. On the
# project's CI machines that is a local CPU build; on a GPU node, PyPI's default build for CUDA 13, which needs an
# NVIDIA driver >= 580. For an older driver pick the CUDA build it runs (README, "Set-up on a GPU node"), e.g.
#   make clean setup TORCH_INDEX=https://download.pytorch.org/whl/cu126
TORCH_INDEX ?=

# torch first, pinned: an unpinned torch (asked for by deepspeed) would pull whatever build pip picks.
# pip byte-compiles what it installs one file at a time (about a minute here); compileall does it on every core.
# Files written for other Python versions fail to compile, as they do silently under pip.
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -c constraints.txt torch $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q --no-compile -c constraints.txt -e '.[dev]'
	$(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
	$(PY) -c "from launcher.distributed import build_cpu_ops; build_cpu_ops()"
	touch $(STAMP)

demo: setup
	$(PY) -m launcher demo

# Debian's packages whose daemons the multi-node tests start for real (sshd and pdsh, munge, a Slurm controller and
# its node daemons), each in a temporary folder of its own: installed where this is root and apt-get reaches the
# package index; elsewhere those tests are skipped with the reason (CI sets LAUNCHER_REQUIRE_SERVICES=1: it must not)
SERVICES := openssh-server pdsh munge slurmctld slurmd slurm-client
services:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s $(SERVICES) >/dev/null 2>&1; then \
		echo "installing $(SERVICES) (for the multi-node tests)"; \
		apt-get install -y -q $(SERVICES) >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(SERVICES) >/dev/null 2>&1; } || \
		echo "could not install $(SERVICES): the multi-node tests will be skipped"; \
	fi

# the suite (CI runs this); `test-all` adds the tests marked `long` (a dry run of bench/gpu_check.sh)
test: setup services
	$(PY) -m pytest -q -m "not long"

test-all: setup services
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check launcher tests bench train_ds.py

bench: setup
	$(PY) bench/shard_throughput.py

clean:
	rm -rf $(VENV) runs shards
