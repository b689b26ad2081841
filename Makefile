# The two commands of README.md: `make demo` and `make test`. Both create/reuse .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.hpad-installed
PROMTOOL := $(VENV)/bin/promtool
DEMO_ARGS ?=
# the demo's broker: tansu (embedded, default) or kafka (Apache Kafka, consumers/apache_kafka.py)
BROKER ?= tansu
# Apache Kafka's runtime classpath, resolved by Maven from deploy/kafka/pom.xml (jars stay in Maven's cache)
KAFKA_POM := deploy/kafka/pom.xml
KAFKA_CP := build/kafka/classpath.txt
# Debian packages the tests drive for real, as command:package (checked on PATH; installed by `make system-tools`
# with apt-get when run as root, else `make test` stops naming them)
DEB_TOOLS := ffmpeg:ffmpeg rtsp-server-perl:rtsp-server-perl prometheus-alertmanager:prometheus-alertmanager \
  prometheus:prometheus chromium:chromium

.PHONY: venv test demo system-tools kafka-classpath lint bench-scorer bench-train bench-stream bench-swap bench-soak bench-host deploy-check clean

venv: $(STAMP) $(PROMTOOL)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch and torchvision in one command, pinned (an unpinned torch pulls a multi-GB build)
	$(PIP) install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP) $(PROMTOOL) $(KAFKA_CP) system-tools
	$(PY) -m ruff check hpad consumers tuner tests benchmarks deploy
	# pytest exit 5 ("no tests collected") counts as a failure. tests/deploy run in their own process: helm's
	# Go library (helm-python-sdk, loaded in-process) crashed the interpreter (SIGSEGV) when it was loaded
	# after the suites that load the native runtimes (torch, OpenVINO, ONNX Runtime, Chromium drivers).
	$(PY) -m pytest -q --ignore=tests/deploy $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; \
	  $(PY) -m pytest -q tests/deploy; rc2=$$?; \
	  if [ $$rc -ne 0 ]; then exit $$rc; fi; exit $$rc2

demo: $(STAMP) $(if $(filter kafka,$(BROKER)),$(KAFKA_CP))
	$(PY) -m consumers.demo --broker $(BROKER) $(DEMO_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check hpad consumers tuner tests benchmarks deploy

bench-scorer: $(STAMP)
	$(PY) benchmarks/scorer.py

bench-train: $(STAMP)
	$(PY) benchmarks/train.py

bench-stream: $(STAMP)
	$(PY) benchmarks/stream.py

bench-swap: $(STAMP)
	$(PY) benchmarks/swap.py

bench-soak: $(STAMP)
	$(PY) benchmarks/soak.py

bench-host: $(STAMP)
	$(PY) benchmarks/host.py

.PHONY: bench-runtimes
bench-runtimes: $(STAMP)
	$(PY) benchmarks/runtimes.py

# promtool (Prometheus rules checks of the deploy tests): the one on PATH, else extracted from Debian's
# `prometheus` package into the venv: `apt-get download` needs no root, `dpkg -x` unpacks without installing.
$(PROMTOOL): | $(STAMP)
	@if command -v promtool >/dev/null 2>&1; then ln -sf "$$(command -v promtool)" $@; else \
	  dest="$$(realpath -m $@)" && tmp="$$(mktemp -d)" && ( cd "$$tmp" && \
	    { apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus; }; } && \
	    dpkg -x prometheus_*.deb root && install -m 755 root/usr/bin/promtool "$$dest" ); rc=$$?; rm -rf "$$tmp"; \
	  [ $$rc -eq 0 ] || { echo "could not get promtool from Debian's prometheus package" >&2; exit 1; }; fi
	@$@ --version >/dev/null

# the real programs of the test suite (video streams, Alertmanager, Prometheus, a browser), from Debian's packages
system-tools:
	@missing=""; for pair in $(DEB_TOOLS); do command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "make test needs Debian packages:$$missing (apt-get install -y$$missing)" >&2; exit 1; fi; \
	echo "installing Debian packages:$$missing"; \
	{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } \
	  || { echo "apt-get could not install:$$missing" >&2; exit 1; }

# Apache Kafka for tests and `make demo BROKER=kafka`: the classpath file is the stamp (rebuilt when the pom changes)
kafka-classpath: $(KAFKA_CP)

$(KAFKA_CP): $(KAFKA_POM)
	@command -v java >/dev/null 2>&1 || { echo "Apache Kafka needs java (17+) on PATH" >&2; exit 1; }
	@command -v mvn >/dev/null 2>&1 || { echo "resolving Apache Kafka needs mvn (Maven 3.8+) on PATH" >&2; exit 1; }
	mkdir -p $(@D)
	mvn -q -B -Dstyle.color=never -f $(KAFKA_POM) dependency:build-classpath -Dmdep.outputFile=$(abspath $@).tmp
	mv $@.tmp $@

# the Helm chart, images, dashboard and alert rules (offline: no cluster, no Docker daemon)
deploy-check: $(STAMP) $(PROMTOOL)
	$(PY) -m ruff check deploy tests/deploy
	$(PY) -m pytest -q tests/deploy $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
