# glide_lightning: set up, test, prepare data, train and benchmark. `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
BENCH_OUT ?= bench/results.json

EXP    ?=
RECIPE ?=
ARGS   ?=
# extra flags of the synthetic recipe when `make train EXP=smoke` builds data/synthetic (ARGS are the training's)
SMOKE_DATA_ARGS ?=
RUNS   ?=
CKPT   ?=
RES    ?=
SCALES ?=
ifeq ($(EXP),smoke)  # held-out synthetic shapes; random features (no weights to download), labelled as such
N         ?= 200
CAPTIONS  ?= data/synthetic/fid_captions.txt
REFERENCE ?= data/synthetic/fid_reference
EVAL_EXTRA ?= --extractor random-conv --clip-model none
endif
N      ?= 5000
CAPTIONS  ?= data/mscoco/fid_captions.txt
REFERENCE ?= data/mscoco/fid_reference
EVAL_ARGS = --run-dir runs/$(EXP) $(if $(CKPT),--ckpt $(CKPT)) --n $(N) $(if $(RES),--res $(RES)) \
            --captions $(CAPTIONS) --reference $(REFERENCE) $(EVAL_EXTRA)
EXPERIMENTS := $(sort $(basename $(notdir $(wildcard experiments/*.yaml))))
RECIPES     := synthetic folder mscoco stanford_dogs sbucaptions

.PHONY: help setup test bench train data fid sweep compare check-exp check-recipe clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  experiments: $(EXPERIMENTS)"
	@echo "  recipes:     $(RECIPES)"

setup: $(VENV)/.installed  ## create .venv and install the package, its dependencies and the dev tools

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $@

test: setup  ## run the test suite (offline, CPU; GPU-only tests are skipped)
	$(PY) -m pytest -q

bench: setup  ## time models, training, sampling, data pipeline and FID/CLIP features; writes bench/results.json [ARGS="--repeats 3"]
	$(PY) -m glide_lightning.bench --out $(BENCH_OUT) $(ARGS)

train: check-exp setup  ## train EXP=<experiment> [ARGS="--trainer.max_steps 100 ..."]; resumes its run if it has a checkpoint
	@if [ "$(EXP)" = smoke ] && ! ls data/synthetic/train-*.tar >/dev/null 2>&1; then \
		echo "data/synthetic is empty: building the synthetic shards first"; \
		$(PY) -m data_recipes synthetic --out data/synthetic $(SMOKE_DATA_ARGS); fi
	$(PY) -m glide_lightning fit --config experiments/$(EXP).yaml $(ARGS)

fid: check-exp setup  ## zero-shot FID + CLIP score: EXP=<run> [CKPT=] [N=5000] [SCALES="1.5 3"] [RES=64|256] [ARGS="--upsampler upsample.pt"]
	$(PY) -m glide_lightning fid $(EVAL_ARGS) $(if $(SCALES),--scales $(SCALES)) $(ARGS)

sweep: check-exp setup  ## FID and CLIP score per guidance scale, table and trade-off plot: EXP=<run> [SCALES=...]
	$(PY) -m glide_lightning sweep $(EVAL_ARGS) --scales $(or $(SCALES),1 2 3 4 6 8 12) $(ARGS)

compare: setup  ## ablation report from the runs' own files: RUNS="minig_simple minig_hybrid"
	@if [ -z "$(RUNS)" ]; then echo 'use RUNS="<run> <run> ..." (directories under runs/)' >&2; exit 2; fi
	$(PY) -m glide_lightning compare $(addprefix runs/,$(RUNS)) --out reports/$(subst $(eval) ,_vs_,$(strip $(RUNS))).md $(ARGS)

data: check-recipe setup  ## build shards: RECIPE=<recipe> [ARGS="..."] (python -m data_recipes RECIPE --help)
	$(PY) -m data_recipes $(RECIPE) $(if $(filter synthetic,$(RECIPE)),$(or $(ARGS),--out data/synthetic),$(ARGS))

check-exp:
	@if [ -z "$(EXP)" ] || [ ! -f "experiments/$(EXP).yaml" ]; then \
		echo "unknown experiment '$(EXP)': use EXP=<name> with one of: $(EXPERIMENTS)" >&2; exit 2; fi

check-recipe:
	@if [ -z "$(filter $(RECIPE),$(RECIPES))" ] || [ -z "$(RECIPE)" ]; then \
		echo "unknown recipe '$(RECIPE)': use RECIPE=<name> with one of: $(RECIPES)" >&2; exit 2; fi

clean:  ## remove caches (keeps .venv, data and runs)
	rm -rf .pytest_cache build dist *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
