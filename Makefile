# Kestrel: the two commands are `make run` and `make test` (see README). Both install what is missing first.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: install plugin run test lint bench openapi clean

install:
	./bootstrap.sh
	$(MAKE) -s plugin

plugin:
	$(MAKE) -C broker/mosquitto all

run: install
	$(PY) -m kestrel run

test: install lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	.venv/bin/lint-imports --no-cache

bench: install
	$(PY) bench/run.py
	$(PY) bench/identity_bench.py
	$(PY) bench/api_bench.py
	$(PY) bench/twin_bench.py

openapi: install
	$(PY) -m api openapi > api/openapi.json
	$(PY) -m api graphql-schema > api/schema.graphql

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
	$(MAKE) -C broker/mosquitto clean
