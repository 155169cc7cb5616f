# Kestrel: the two commands are `make run` and `make test` (see README). Both install what is missing first.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: install plugin run test lint bench bench-smoke openapi clean

install:
	./bootstrap.sh
	$(MAKE) -s plugin

plugin:
	$(MAKE) -C broker/mosquitto all

run: install
	$(PY) -m kestrel run

test: install lint bench-smoke
	$(PY) -m pytest $(PYTEST_ARGS)

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	.venv/bin/lint-imports --no-cache

# Every benchmark in smoke mode (seconds): each must run end to end and print its ratios (bench/smoke.py).
bench-smoke: install
	$(PY) bench/smoke.py

bench: install
	$(PY) bench/run.py
	$(PY) bench/identity_bench.py
	$(PY) bench/api_bench.py
	$(PY) bench/twin_bench.py

openapi: install
	$(PY) -m api openapi > api/openapi.json
	$(PY) -m api graphql-schema > api/schema.graphql
	$(PY) -m kestrel.devtools.asyncapi > api/asyncapi.json
	$(PY) -m kestrel.devtools.envdoc

clean:
	rm -rf .venv .venv-tools node_modules .mypy_cache .ruff_cache .pytest_cache
	$(MAKE) -C broker/mosquitto clean
