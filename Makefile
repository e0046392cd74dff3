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
# fid / sweep evaluate runs/<RUN> (a run named with --run.name), or runs/<EXP> when RUN is not given
RUN    ?=
CKPT   ?=
RES    ?=
# evaluation settings per experiment: experiments/eval/<EXP>.yaml, read by `fid|sweep --config` (absent: the
# commands' defaults, the MSCOCO set); N=, CAPTIONS=, REFERENCE=, SCALES= and ARGS= given here override it
EVAL_CONFIG = $(wildcard experiments/eval/$(EXP).yaml)
# guidance scales, e.g. SCALES="1.5 3"; empty: the eval config's, else the command's default (fid: the sampling
# default scale, sweep: DEFAULT_GUIDANCE_SWEEP in glide_lightning/sampling/config.py; the one list of it)
SCALES ?=
# sweep only: samplers and step counts to sweep as well, e.g. SAMPLERS="ddpm ddim dpmpp_2m unipc" STEPS="10 25 50"
# (quality against model evaluations per image: <out>/nfe_sweep.png); empty: the sampling config's own
SAMPLERS ?=
STEPS  ?=
N         ?=
CAPTIONS  ?=
REFERENCE ?=
empty :=
space := $(empty) $(empty)
comma := ,
RUN_DIR = runs/$(or $(RUN),$(EXP))
yaml_list = '[$(subst $(space),$(comma),$(strip $(1)))]'
yaml_str_list = '[$(subst $(space),$(comma),$(patsubst %,"%",$(strip $(1))))]'
SWEEP_ARGS = $(if $(strip $(SAMPLERS)),--samplers $(call yaml_list,$(SAMPLERS))) \
             $(if $(strip $(STEPS)),--step_counts $(call yaml_str_list,$(STEPS)))
EVAL_ARGS = $(if $(EVAL_CONFIG),--config $(EVAL_CONFIG)) --run_dir $(RUN_DIR) $(if $(CKPT),--ckpt $(CKPT)) \
            $(if $(N),--n $(N)) $(if $(RES),--res $(RES)) $(if $(CAPTIONS),--captions $(CAPTIONS)) \
            $(if $(REFERENCE),--reference $(REFERENCE)) $(if $(strip $(SCALES)),--scales $(call yaml_list,$(SCALES)))
EXPERIMENTS := $(sort $(basename $(notdir $(wildcard experiments/*.yaml))))
# the data recipes: every module of data_recipes/ but common.py and _private ones (its registry's rule)
RECIPES     := $(sort $(filter-out common images,$(basename $(notdir $(filter-out data_recipes/_%,$(wildcard data_recipes/*.py))))))

.PHONY: help setup test bench bench-gpu bench-learning train data sample fid sweep compare ablation ablation-smoke check-exp check-run check-recipe clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  experiments: $(EXPERIMENTS)"
	@echo "  recipes:     $(RECIPES)"

setup: $(VENV)/.installed  ## create .venv and install the package, its dependencies and the dev tools

# a few lines: what it installs, pip's warnings and errors, how long it took. Left out: pip's "Location '...' is
# ignored" lines (an extra index in pip's own config that lacks a package: none of this project's business) and
# setuptools' 10-line advice that editable installs of a flat layout prefer same-named folders of the working
# directory (true of every editable install from a checkout; this one imports from its checkout by design).
$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "setup: glide_lightning[dev] (editable) and its dependencies at constraints.txt's versions into $(VENV)/"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@start=$$(date +%s); \
	{ $(PIP) install --quiet --upgrade pip && $(PIP) install --quiet -c constraints.txt -e '.[dev]'; \
	  echo "pip-exit-status $$?"; } 2>&1 | awk '/^pip-exit-status /{exit $$2} /BuildBackendWarning: Editable/{skip=1} !skip && !/^WARNING: Location .* is ignored: /; /with strategy, WheelFile/{skip=0}'; \
	status=$$?; if [ $$status -ne 0 ]; then echo "setup: pip failed (exit status $$status)" >&2; exit $$status; fi; \
	echo "setup: done in $$(( $$(date +%s) - start )) s ($$($(PY) -m pip list --format=freeze 2>/dev/null | wc -l) packages in $(VENV)/)"
	@touch $@

test: setup  ## run the test suite (offline, CPU; GPU-only tests are skipped) on one pytest-xdist worker per core, a test file each, then the 15 slowest tests
	$(PY) -m pytest -q -n auto --dist loadfile --durations=15

bench: setup  ## time models, training, sampling (eager and compiled), data pipeline and FID/CLIP features against their arithmetic floors; writes bench/results.json, ~35 min on 2 cores [ARGS="--repeats 3 --compile false"]
	$(PY) -m glide_lightning bench --out $(BENCH_OUT) $(ARGS)

# the synthetic shards of the smoke experiment and the toy ablation, built when missing
SYNTHETIC_DATA = @if ! ls data/synthetic/train-*.tar >/dev/null 2>&1; then \
		echo "data/synthetic is empty: building the synthetic shards first"; \
		$(PY) -m glide_lightning data synthetic --out data/synthetic $(SMOKE_DATA_ARGS); fi

bench-gpu: setup  ## on a machine with a CUDA GPU: miniGLIDE bf16 training images/s and MFU with and without compile, guided sampling images/s with and without CUDA graphs at batch 1 and 64: bench/results-gpu.json [ARGS=]
	$(PY) scripts/bench_gpu.py --out bench/results-gpu.json $(ARGS)

bench-learning: setup  ## how fast the presets learn (smoke adherence within its budget, grayscale samples of grayscale data): bench/learning.json, ~35 min on 2 cores [ARGS="--skip grayscale"]
	$(PY) scripts/bench_learning.py --out bench/learning.json $(ARGS)

train: check-exp setup  ## train EXP=<experiment> [ARGS="--trainer.max_steps 100 ..."]; resumes its run if it has a checkpoint
	$(if $(filter smoke noised_clip smoke_upsample smoke_inpaint,$(EXP)),$(SYNTHETIC_DATA))
	@if [ "$(EXP)" = laptop_folder ] && [ -z "$(findstring train_shards,$(ARGS))" ] \
		&& ! ls data/folder/train-*.tar >/dev/null 2>&1; then \
		echo "data/folder has no shards: build them from your images first, e.g." >&2; \
		echo "  make data RECIPE=folder ARGS=\"--images my_pictures/ --out data/folder\"" >&2; \
		echo "(or train on shards elsewhere: ARGS=\"--data.train_shards 'DIR/train-*.tar'\")" >&2; exit 2; fi
	$(PY) -m glide_lightning fit --config experiments/$(EXP).yaml $(ARGS)

sample: setup  ## images from prompts: ARGS='--ckpt runs/smoke/checkpoints/last.ckpt --prompt "a large red circle"'
	$(PY) -m glide_lightning sample $(ARGS)

fid: check-run setup  ## zero-shot FID + CLIP score: EXP=<experiment> or RUN=<run name> [CKPT=] [N=5000] [SCALES="1.5 3"] [RES=64|256] [ARGS="--upsampler upsample.pt"]
	$(PY) -m glide_lightning fid $(EVAL_ARGS) $(ARGS)

sweep: check-run setup  ## FID and CLIP score per guidance scale, table and trade-off plot: EXP=<experiment> or RUN=<run name> [SCALES=...] [SAMPLERS="ddim dpmpp_2m" STEPS="10 25": quality vs model evaluations]
	$(PY) -m glide_lightning sweep $(EVAL_ARGS) $(SWEEP_ARGS) $(ARGS)

compare: setup  ## ablation report from the runs' own files: RUNS="minig_simple minig_hybrid"
	@if [ -z "$(RUNS)" ]; then echo 'use RUNS="<run> <run> ..." (directories under runs/)' >&2; exit 2; fi
	$(PY) -m glide_lightning compare --runs $(call yaml_list,$(addprefix runs/,$(RUNS))) \
		--out reports/$(subst $(space),_vs_,$(strip $(RUNS))).md $(ARGS)

# ablation groups: experiments/ablations/<GROUP>.yaml names the arms (experiment configs) and the evaluation settings;
# every arm is trained and swept once per seed in runs/<GROUP>/<arm>_seed<k>/ (resumable: done runs are skipped),
# then reports/<GROUP>.md compares the arms with intervals over seeds and generated images. GROUP= or EXP= names it.
GROUP  ?=
SEEDS  ?=
ABLATION_GROUPS := $(sort $(basename $(notdir $(wildcard experiments/ablations/*.yaml))))
ablation: setup  ## every arm x seed of an ablation group, trained, swept and compared with intervals: GROUP=minig SEEDS="0 1 2" [ARGS="--fit_args '[--trainer.max_steps, \"100\"]'"]
	@if [ -z "$(filter $(or $(GROUP),$(EXP)),$(ABLATION_GROUPS))" ]; then \
		echo "unknown ablation group '$(or $(GROUP),$(EXP))': use GROUP=<one of: $(ABLATION_GROUPS)>" >&2; exit 2; fi
	$(if $(filter ablation_smoke,$(or $(GROUP),$(EXP))),$(SYNTHETIC_DATA))
	$(PY) -m glide_lightning ablation $(or $(GROUP),$(EXP)) --seeds $(call yaml_list,$(or $(SEEDS),0 1 2)) $(ARGS)

# toy-scale miniGLIDE ablation: the group experiments/ablations/ablation_smoke.yaml (arms in experiments/ablation_smoke/,
# each swept as experiments/eval/ablation_smoke.yaml says, on ABLATION_N held-out captions), once per seed
ABLATION_N    ?= 64
ablation-smoke: setup  ## hybrid vs simple arm of the smoke model per seed (SEEDS="0 1" by default; estimated ~17 min per arm and seed, ~70 min in all, on 2 free cores): train, evaluate at 100 and 25 DDPM steps over guidance 1/3/6, write reports/ablation_smoke.md with intervals [ARGS= to the ablation command]
	$(SYNTHETIC_DATA)
	$(PY) -m glide_lightning ablation ablation_smoke --seeds $(call yaml_list,$(or $(SEEDS),0 1)) \
		--eval_args '[--n, "$(ABLATION_N)"]' $(ARGS)  # this target remakes the committed report

data: check-recipe setup  ## build shards: RECIPE=<recipe> [ARGS="..."] (python -m glide_lightning data RECIPE --help)
	$(PY) -m glide_lightning data $(RECIPE) $(if $(filter synthetic,$(RECIPE)),$(or $(ARGS),--out data/synthetic),$(ARGS))

check-exp:
	@if [ -z "$(EXP)" ] || [ ! -f "experiments/$(EXP).yaml" ]; then \
		echo "unknown experiment '$(EXP)': use EXP=<name> with one of: $(EXPERIMENTS)" >&2; exit 2; fi

check-run:
	@if [ -n "$(RUN)" ]; then if [ ! -d "runs/$(RUN)" ]; then \
		echo "no run directory runs/$(RUN): use RUN=<one of: $$(ls runs 2>/dev/null | tr '\n' ' ')>" >&2; exit 2; fi; \
	else $(MAKE) -s check-exp EXP="$(EXP)"; fi

check-recipe:
	@if [ -z "$(filter $(RECIPE),$(RECIPES))" ] || [ -z "$(RECIPE)" ]; then \
		echo "unknown recipe '$(RECIPE)': use RECIPE=<name> with one of: $(RECIPES)" >&2; exit 2; fi

clean:  ## remove caches (keeps .venv, data and runs)
	rm -rf .pytest_cache build dist *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
