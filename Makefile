# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# torch first, pinned: an unpinned torch (asked for by deepspeed or accelerate) pulls gigabytes of CUDA wheels.
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m launcher demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check launcher tests bench train_ds.py

bench: setup
	$(PY) bench/shard_throughput.py

clean:
	rm -rf $(VENV) runs shards
