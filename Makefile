# Kestrel: the two commands are `make run` and `make test` (see README). Both install what is missing first.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: install plugin run test lint hooks bench bench-smoke openapi clean

install:
	./bootstrap.sh
	$(MAKE) -s plugin

plugin:
	$(MAKE) -C broker/mosquitto all

# `make run PROMETHEUS=1` also runs Prometheus on :19090, scraping every service with the SLO rules.
run: install
	$(PY) -m kestrel run $(if $(PROMETHEUS),--prometheus)

test: install lint bench-smoke
	$(PY) -m pytest $(PYTEST_ARGS)

# The pre-commit hooks on every tracked file (what contributors run on each commit), then the tree-wide checks that
# also see files git does not track yet.
lint:
	.venv/bin/pre-commit run --all-files --show-diff-on-failure
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# Install the pre-commit hooks in this clone (one command, after `make install`).
hooks: install
	.venv/bin/pre-commit install

# Every benchmark in smoke mode (seconds): each must run end to end and print its ratios (bench/smoke.py).
bench-smoke: install
	$(PY) bench/smoke.py

bench: install
	$(PY) bench/run.py
	$(PY) bench/identity_bench.py
	$(PY) bench/api_bench.py
	$(PY) bench/twin_bench.py
	$(PY) bench/rules_bench.py
	$(PY) bench/streams_bench.py

# Regenerate the committed documents: OpenAPI, GraphQL SDL, AsyncAPI, the services' KESTREL_* tables.
openapi: install
	$(PY) -m kestrel.devtools.contracts --write

clean:
	rm -rf .venv .venv-tools .venv-checkov .venv-ansible node_modules .mypy_cache .ruff_cache .pytest_cache
	$(MAKE) -C broker/mosquitto clean
