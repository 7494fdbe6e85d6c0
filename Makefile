# World Models on CarRacing-v3. `make test`, `make pipeline` and `make smoke` create .venv when missing.
#
#   make test       the test suite
#   make lint       ruff: the linter and the formatter's check (`ruff format .` fixes the layout)
#   make faults     the full fault-injection suite: kill -9 inside every write, every damaged input (a few minutes)
#   make pipeline   data -> V -> M -> C, then TEST_EPISODES test episodes and $(LOGDIR)/report/report.md;
#                   rerun it after an interruption: every stage resumes where it stopped
#   make smoke      the same pipeline at toy size, from scratch, into $(SMOKE_DIR) (about a minute)
#   make bench      speed benchmarks
#   make data | vae | mdrnn | ctrl | evaluate | report    one stage alone, same settings
#
# Override any setting on the command line: make pipeline LOGDIR=runs/big ROLLOUTS=400 GENERATIONS=60

# ---- settings: empty means the scripts' own default, the default profile (utils/profile.py) ----
# Set any of these on the command line; only what is set is passed on, so `make pipeline` runs
# exactly the README's by-hand commands. e.g. make pipeline LOGDIR=runs/big ROLLOUTS=400 GENERATIONS=60
# run folder: vae/, mdrnn/, ctrl/ (checkpoints, logs, curves) and report/
LOGDIR ?= logs
# the agent acts every this many env frames, in every stage (default 4; 1 is the paper)
ACTION_REPEAT ?=
# rollout folder (default datasets/carracing-k<ACTION_REPEAT>, one folder per k)
DATASET ?= $(if $(ACTION_REPEAT),datasets/carracing-k$(ACTION_REPEAT))
# Brownian-policy rollouts, and env frames per rollout at most
ROLLOUTS ?=
ROLLOUT_STEPS ?=
# worker processes of generation, C's search and the test (default: all CPU cores)
WORKERS ?= $(THREADS)
# episodes a worker drives side by side as one batch
ENVS_PER_WORKER ?=
# where the workers run: local processes, or Ray actors (BACKEND=ray; RAY_ADDRESS=HOST:PORT joins a cluster)
BACKEND ?=
RAY_ADDRESS ?=
# V and M epochs; steps per M training sequence; M's architecture (lstm, the default, or transformer)
M_ARCH ?=
VAE_EPOCHS ?=
MDRNN_EPOCHS ?=
SEQ_LEN ?=
# real: C learns in the real env (CMA-ES); dream: CMA-ES inside M (--dream), at TEMPERATURE;
# imagine: an actor-critic through M, in ROUNDS rounds that collect real rollouts (--imagine)
CTRL_MODE ?= real
TEMPERATURE ?=
ROUNDS ?=
# a training episode ends after this many frames without a new tile (0: never)
STALL_FRAMES ?=
# iterative data: every REFRESH_EVERY generations from generation REFRESH_START on, the CMA-ES mean plus
# noise plays new tracks and M is fine-tuned on them (default 0: never; agent/refresh.py)
REFRESH_EVERY ?=
REFRESH_START ?=
# noisy real rollouts per imagination round or per refresh
COLLECT_EPISODES ?=
# CMA-ES population, tracks per candidate (doubled every SAMPLES_DOUBLE_EVERY generations up to
# MAX_SAMPLES; off by default), generations, the evaluations of its mean, and the final re-scoring of its best means
POP_SIZE ?=
N_SAMPLES ?=
SAMPLES_DOUBLE_EVERY ?=
MAX_SAMPLES ?=
GENERATIONS ?=
EVAL_EVERY ?=
EVAL_EPISODES ?=
RESCORE_EPISODES ?=
# env frames per controller / test episode at most, and held-out test episodes
EPISODE_STEPS ?=
TEST_EPISODES ?=
# the test's lowest-return episodes replayed as GIFs into $(LOGDIR)/ctrl/eval/worst/ (and the report)
WORST_EPISODES ?= 5
# --noreload makes every stage start afresh instead of resuming (smoke sets it)
NORELOAD ?=

# ---- make smoke: every stage for real at toy size, from scratch (deletes $(SMOKE_DIR)/dataset and /logdir) ----
SMOKE_DIR ?= runs/smoke
SMOKE_PROFILE = LOGDIR=$(SMOKE_DIR)/logdir DATASET=$(SMOKE_DIR)/dataset NORELOAD=--noreload \
	ROLLOUTS=4 ROLLOUT_STEPS=60 MDRNN_EPOCHS=1 SEQ_LEN=16 \
	POP_SIZE=4 N_SAMPLES=1 GENERATIONS=2 EVAL_EVERY=1 EVAL_EPISODES=2 RESCORE_EPISODES=2 EPISODE_STEPS=52 \
	TEST_EPISODES=3

# ---- interpreter ----
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# .venv is made only when PY is its interpreter: `make smoke PY=/some/python` uses that one as it is
VENV_DEP := $(if $(filter $(VENV)/bin/python,$(PY)),venv)

ifeq ($(filter $(CTRL_MODE),real dream imagine),)
$(error CTRL_MODE must be real, dream or imagine, not '$(CTRL_MODE)')
endif
# `$(call flag,VAR,--flag)`: "--flag $(VAR)" when VAR is set, nothing when it is empty (the script's default)
flag = $(if $($(1)),$(2) $($(1)))
POOL_FLAGS = $(call flag,WORKERS,--workers) $(call flag,BACKEND,--backend) $(call flag,RAY_ADDRESS,--ray-address)
AGENT_FLAGS = $(POOL_FLAGS) $(call flag,ENVS_PER_WORKER,--envs-per-worker) $(call flag,EPISODE_STEPS,--max-steps)
CTRL_FLAGS = $(if $(filter dream,$(CTRL_MODE)),--dream $(call flag,TEMPERATURE,--temperature),\
	$(if $(filter imagine,$(CTRL_MODE)),--imagine $(call flag,ROUNDS,--rounds),\
	$(call flag,STALL_FRAMES,--stall-frames) $(call flag,REFRESH_EVERY,--refresh-every) $(call flag,REFRESH_START,--refresh-start)) \
	$(call flag,COLLECT_EPISODES,--collect-episodes))
# each stage runs through reporting/timing.py: one row per run (stage, seconds, started, status, command)
# appended to timings.csv, never overwritten; the report sums the runs of each stage
TIMED = $(PY) -m reporting.timing --csv $(LOGDIR)/report/timings.csv --stage

.PHONY: venv test lint faults bench clean-venv pipeline smoke data vae mdrnn ctrl evaluate report
.NOTPARALLEL:  # the stages run one after another, in the order the prerequisites are listed

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

test: venv
	$(PY) -m pytest -q -n auto --dist loadfile tests

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# every kill point and every damaged input of tests/test_faults.py (make test runs every damaged input and 3 kill points)
faults: venv
	$(PY) -m pytest -q -m faults tests/test_faults.py

bench: venv
	$(PY) bench/bench_env.py
	$(PY) bench/bench_generation.py
	$(PY) bench/bench_vae.py
	$(PY) bench/bench_mdrnn.py
	$(PY) bench/bench_controller.py
	$(PY) bench/bench_dream.py
	$(PY) bench/bench_imagine.py
	$(PY) -c "import ray" 2>/dev/null && $(PY) bench/bench_ray.py || echo "bench_ray.py skipped: pip install -r requirements-ray.txt"

clean-venv:
	rm -rf $(VENV)

pipeline: $(VENV_DEP) data vae mdrnn ctrl evaluate report

smoke: $(VENV_DEP)
	rm -rf $(SMOKE_DIR)/dataset $(SMOKE_DIR)/logdir
	$(MAKE) --no-print-directory pipeline $(SMOKE_PROFILE)

data: $(VENV_DEP)
	$(TIMED) data -- $(PY) data/generation_script.py $(call flag,ROLLOUTS,--rollouts) $(call flag,DATASET,--rootdir) \
		$(call flag,ROLLOUT_STEPS,--max-steps) $(call flag,ACTION_REPEAT,--action-repeat) $(POOL_FLAGS)

vae: $(VENV_DEP)
	$(TIMED) vae -- $(PY) trainvae.py --logdir $(LOGDIR) $(call flag,DATASET,--dataset) $(call flag,VAE_EPOCHS,--epochs) $(NORELOAD)

mdrnn: $(VENV_DEP)
	$(TIMED) mdrnn -- $(PY) trainmdrnn.py --logdir $(LOGDIR) $(call flag,DATASET,--dataset) $(call flag,MDRNN_EPOCHS,--epochs) \
		$(call flag,SEQ_LEN,--seq-len) $(call flag,M_ARCH,--arch) $(NORELOAD)

ctrl: $(VENV_DEP)
	$(TIMED) ctrl -- $(PY) traincontroller.py --logdir $(LOGDIR) $(call flag,POP_SIZE,--pop-size) $(call flag,N_SAMPLES,--n-samples) \
		$(call flag,SAMPLES_DOUBLE_EVERY,--samples-double-every) $(call flag,MAX_SAMPLES,--max-samples) \
		$(call flag,GENERATIONS,--generations) $(call flag,EVAL_EVERY,--eval-every) $(call flag,EVAL_EPISODES,--eval-episodes) \
		$(call flag,RESCORE_EPISODES,--rescore-episodes) \
		$(CTRL_FLAGS) $(AGENT_FLAGS) $(NORELOAD)

# always reruns (no resume): the score must be of the current ctrl/best.pt
evaluate: $(VENV_DEP)
	$(TIMED) test -- $(PY) test_controller.py --logdir $(LOGDIR) $(call flag,TEST_EPISODES,--episodes) \
		--record $(LOGDIR)/ctrl/eval/episode.gif --record-worst $(WORST_EPISODES) $(AGENT_FLAGS)

report: $(VENV_DEP)
	$(PY) -m reporting.report --logdir $(LOGDIR) $(call flag,DATASET,--dataset)
