# World Models on CarRacing-v3. `make test` and `make pipeline` create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv test bench clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) bench/bench_generation.py
	$(PY) bench/bench_env.py

clean-venv:
	rm -rf $(VENV)
