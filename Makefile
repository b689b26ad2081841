# The two commands of README.md: `make demo` and `make test`. Both create/reuse .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.hpad-installed
DEMO_ARGS ?=

.PHONY: venv test demo lint bench-scorer bench-train bench-stream bench-swap deploy-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch and torchvision in one command, pinned (an unpinned torch pulls a multi-GB build)
	$(PIP) install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check hpad consumers tuner tests benchmarks
	# pytest exit 5 ("no tests collected") counts as a failure
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

demo: $(STAMP)
	$(PY) -m consumers.demo $(DEMO_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check hpad consumers tuner tests benchmarks

bench-scorer: $(STAMP)
	$(PY) benchmarks/scorer.py

bench-train: $(STAMP)
	$(PY) benchmarks/train.py

bench-stream: $(STAMP)
	$(PY) benchmarks/stream.py

bench-swap: $(STAMP)
	$(PY) benchmarks/swap.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
