# World Models on CarRacing-v3. `make test`, `make pipeline` and `make smoke` create .venv when missing.
#
#   make test       the test suite
#   make faults     the full fault-injection suite: kill -9 inside every write, every damaged input (a few minutes)
#   make pipeline   data -> V -> M -> C, then TEST_EPISODES test episodes and $(LOGDIR)/report/report.md;
#                   rerun it after an interruption: every stage resumes where it stopped
#   make smoke      the same pipeline at toy size, from scratch, into $(SMOKE_DIR) (about a minute)
#   make bench      speed benchmarks
#   make data | vae | mdrnn | ctrl | evaluate | report    one stage alone, same settings
#
# Override any setting on the command line: make pipeline LOGDIR=runs/big ROLLOUTS=400 GENERATIONS=60

# ---- the default profile: a 2-core CPU, no GPU, 95 minutes, 817.2 ± 131.6 over 100 held-out tracks (README, Results) ----
# run folder: vae/, mdrnn/, ctrl/ (checkpoints, logs, curves) and report/
LOGDIR ?= logs
# the agent acts every this many env frames (frames between are not drawn): rollouts, M, the dream and C
# all work in steps of k frames (1 is the paper; DESIGN.md, Action repeat)
ACTION_REPEAT ?= 4
# rollout folder, one per k (shared by runs; generation skips the rollouts already there)
DATASET ?= datasets/carracing-k$(ACTION_REPEAT)
# Brownian-policy rollouts                   data:  640 x 250 rows (640k env frames) at ~800 rows/s on 2 cores, 3.3 min
ROLLOUTS ?= 640
# steps per rollout at most (1000 is the env's limit)
ROLLOUT_STEPS ?= 1000
# worker processes for data generation, controller training and the test episodes
THREADS ?= 2
# episodes one controller/test worker drives side by side, V, M and C stepping them as one batch
ENVS_PER_WORKER ?= 4
# where those workers run: local processes, or Ray actors (BACKEND=ray; RAY_ADDRESS=HOST:PORT joins a cluster)
BACKEND ?= local
RAY_ADDRESS ?=
# V epochs                                    vae:   144k train frames/epoch at ~330 frames/s, 7.4 min each
VAE_EPOCHS ?= 1
# M epochs                                    mdrnn: latent cache of 160k frames ~1.5 min + ~5 s/epoch, 2.3 min
MDRNN_EPOCHS ?= 10
# steps per M training sequence (truncated BPTT)
SEQ_LEN ?= 32
# real: C learns in the real env; dream: inside M (appends --dream --temperature $(TEMPERATURE))
CTRL_MODE ?= real
# M's sampling temperature in dream mode
TEMPERATURE ?= 1.15
# a training episode ends after this many frames without a new tile (-0.1 per frame left); 0: never
STALL_FRAMES ?= 100
# CMA-ES population                          ctrl:  100 generations of 24 x 4 (+ 20 x 16 evaluations), 79 min
POP_SIZE ?= 24
# episodes (tracks) per candidate; fitness is their mean
N_SAMPLES ?= 4
# CMA-ES generations, counted across resumes
GENERATIONS ?= 100
# evaluate the CMA-ES mean every this many generations (the best evaluation becomes ctrl/best.pt)
EVAL_EVERY ?= 5
# fresh tracks per evaluation
EVAL_EPISODES ?= 16
# steps per controller / test episode at most (1000 is the env's limit)
EPISODE_STEPS ?= 1000
# held-out test episodes                      test:  100 x 1000 frames at k=4 + the GIF, 1.2 min
TEST_EPISODES ?= 100
# --noreload makes every stage start afresh instead of resuming (smoke sets it)
NORELOAD ?=

# ---- make smoke: every stage for real at toy size, from scratch (deletes $(SMOKE_DIR)/dataset and /logdir) ----
SMOKE_DIR ?= runs/smoke
SMOKE_PROFILE = LOGDIR=$(SMOKE_DIR)/logdir DATASET=$(SMOKE_DIR)/dataset NORELOAD=--noreload \
	ROLLOUTS=4 ROLLOUT_STEPS=60 VAE_EPOCHS=1 MDRNN_EPOCHS=1 SEQ_LEN=16 \
	POP_SIZE=4 N_SAMPLES=1 GENERATIONS=2 EVAL_EVERY=1 EVAL_EPISODES=2 EPISODE_STEPS=52 TEST_EPISODES=3

# ---- interpreter ----
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# .venv is made only when PY is its interpreter: `make smoke PY=/some/python` uses that one as it is
VENV_DEP := $(if $(filter $(VENV)/bin/python,$(PY)),venv)

ifeq ($(filter $(CTRL_MODE),real dream),)
$(error CTRL_MODE must be real or dream, not '$(CTRL_MODE)')
endif
CTRL_FLAGS := $(if $(filter dream,$(CTRL_MODE)),--dream --temperature $(TEMPERATURE),--stall-frames $(STALL_FRAMES))
# each stage runs through reporting/timing.py: one row per run (stage, seconds, started, status, command)
# appended to timings.csv, never overwritten; the report sums the runs of each stage
POOL_FLAGS := --backend $(BACKEND) $(if $(RAY_ADDRESS),--ray-address $(RAY_ADDRESS))
TIMED = $(PY) -m reporting.timing --csv $(LOGDIR)/report/timings.csv --stage

.PHONY: venv test faults bench clean-venv pipeline smoke data vae mdrnn ctrl evaluate report
.NOTPARALLEL:  # the stages run one after another, in the order the prerequisites are listed

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

test: venv
	$(PY) -m pytest -q tests

# every kill point and every damaged input of tests/test_faults.py (make test runs a sample)
faults: venv
	$(PY) -m pytest -q -m faults tests/test_faults.py

bench: venv
	$(PY) bench/bench_env.py
	$(PY) bench/bench_generation.py
	$(PY) bench/bench_vae.py
	$(PY) bench/bench_mdrnn.py
	$(PY) bench/bench_controller.py
	$(PY) bench/bench_dream.py
	$(PY) -c "import ray" 2>/dev/null && $(PY) bench/bench_ray.py || echo "bench_ray.py skipped: pip install -r requirements-ray.txt"

clean-venv:
	rm -rf $(VENV)

pipeline: $(VENV_DEP) data vae mdrnn ctrl evaluate report

smoke: $(VENV_DEP)
	rm -rf $(SMOKE_DIR)/dataset $(SMOKE_DIR)/logdir
	$(MAKE) --no-print-directory pipeline $(SMOKE_PROFILE)

data: $(VENV_DEP)
	$(TIMED) data -- $(PY) data/generation_script.py --rollouts $(ROLLOUTS) --rootdir $(DATASET) --threads $(THREADS) --max-steps $(ROLLOUT_STEPS) --action-repeat $(ACTION_REPEAT) $(POOL_FLAGS)

vae: $(VENV_DEP)
	$(TIMED) vae -- $(PY) trainvae.py --logdir $(LOGDIR) --dataset $(DATASET) --epochs $(VAE_EPOCHS) $(NORELOAD)

mdrnn: $(VENV_DEP)
	$(TIMED) mdrnn -- $(PY) trainmdrnn.py --logdir $(LOGDIR) --dataset $(DATASET) --epochs $(MDRNN_EPOCHS) --seq-len $(SEQ_LEN) $(NORELOAD)

ctrl: $(VENV_DEP)
	$(TIMED) ctrl -- $(PY) traincontroller.py --logdir $(LOGDIR) --pop-size $(POP_SIZE) --n-samples $(N_SAMPLES) \
		--generations $(GENERATIONS) --eval-every $(EVAL_EVERY) --eval-episodes $(EVAL_EPISODES) \
		--max-steps $(EPISODE_STEPS) --max-workers $(THREADS) --envs-per-worker $(ENVS_PER_WORKER) $(CTRL_FLAGS) $(POOL_FLAGS) $(NORELOAD)

# always reruns (no resume): the score must be of the current ctrl/best.pt
evaluate: $(VENV_DEP)
	$(TIMED) test -- $(PY) test_controller.py --logdir $(LOGDIR) --episodes $(TEST_EPISODES) --max-steps $(EPISODE_STEPS) \
		--workers $(THREADS) --envs-per-worker $(ENVS_PER_WORKER) --record $(LOGDIR)/ctrl/eval/episode.gif $(POOL_FLAGS)

report: $(VENV_DEP)
	$(PY) -m reporting.report --logdir $(LOGDIR) --dataset $(DATASET)
