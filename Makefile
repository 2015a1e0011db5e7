# SAE Studio. The two commands: `make run` (the app) and `make test` (the tests).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HTMX_VERSION := 2.0.8
HTMX := static/vendor/htmx.min.js
DATA_DIR ?= $(CURDIR)/data
PORT ?= 5000
REDIS_PORT ?= 6390

# PYTEST_ARGS reaches scripts/test.sh through the environment, quotes and all
export PYTEST_ARGS

.PHONY: run test install install-test system-deps clean calibrate benchmarks

## run: install everything, start Redis, a worker and the web server; print the URL
run:
	@$(MAKE) --no-print-directory -j3 install
	@DATA_DIR="$(DATA_DIR)" PORT="$(PORT)" REDIS_PORT="$(REDIS_PORT)" PY="$(PY)" bash scripts/run.sh

## test: install everything, run the tests that open a database (the `db` mark, which tests/conftest.py
## sets from their fixtures) on SQLite and, beside it, on PostgreSQL, and every other test once, in
## whichever pass claims it first (TEST_SPLIT); each pass starts its own Redis, the PostgreSQL pass its own
## cluster. scripts/test.sh runs the two at once, one torch thread each (why, and the figures:
## benchmarks/results/suite_durations.md); PYTEST_ARGS goes to both.
## The installs run with -j3: the Debian packages (apt) beside the Python ones (pip), each about half a
## minute on a fresh machine.
test:
	@$(MAKE) --no-print-directory -j3 install-test
	@PY="$(PY)" bash scripts/test.sh

system-deps:
	@bash scripts/system_deps.sh $(if $(filter test install-test,$(MAKECMDGOALS)),--browser)

$(VENV)/.created:
	python3 -m venv --system-site-packages $(VENV)
	$(PIP) install -q --upgrade pip
	@touch $@

# One pip call installs torch (only when it is not importable: a GPU box keeps its own CUDA build) with
# the project, so that the resolver takes torch 2.13.0 for sae-lens too and never a CUDA build of its own.
# pip byte-compiles what it installs on one core (29 of its 65 s); compileall does it on every core (16 s
# on two). The compiled files are needed: where PYTHONDONTWRITEBYTECODE is set, as on these machines, a
# module without one is compiled again by every process that imports it (torch and the app: 4.6 s, not 2.5).
SITE_PACKAGES = $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
INSTALL = $(PY) -c "import torch" 2>/dev/null && { torch=""; echo "torch already importable: keeping it"; } \
	|| torch="torch==2.13.0"; \
	$(PIP) install -q --no-compile $$torch -e
# (a file that does not compile, as pip's own compile step, is no error)
COMPILE = $(PY) -m compileall -q -j 0 "$(SITE_PACKAGES)" >/dev/null || true

$(VENV)/.installed: pyproject.toml | $(VENV)/.created
	@echo "pip install -e '.[models]'"; $(INSTALL) '.[models]'
	@$(COMPILE)
	@touch $@

# the test extra is a superset of what `make run` needs: it stands for both
$(VENV)/.installed-test: pyproject.toml | $(VENV)/.created
	@echo "pip install -e '.[test,models]'"; $(INSTALL) '.[test,models]'
	@$(COMPILE)
	@touch $@ $(VENV)/.installed

$(HTMX): | system-deps
	@bash scripts/fetch_htmx.sh $(HTMX_VERSION) $(HTMX)

install: system-deps $(VENV)/.installed $(HTMX)

install-test: system-deps $(VENV)/.installed-test $(HTMX)

## calibrate: re-measure the L0 model, score it on held-out sources, check the recommendations land
## (about 90 minutes on two CPU cores; a stopped sweep carries on where it was)
calibrate: install-test
	for plan in fit heldout; do \
	  $(PY) benchmarks/calibrate_l1_alpha.py sweep --plan $$plan --shard 0/2 & \
	  $(PY) benchmarks/calibrate_l1_alpha.py sweep --plan $$plan --shard 1/2; wait; done
	$(PY) benchmarks/calibrate_l1_alpha.py fit
	$(PY) benchmarks/recommendations.py

## benchmarks: the speed figures, each beside its baseline
benchmarks: install-test
	$(PY) benchmarks/validator_speed.py
	$(PY) benchmarks/trainer_vs_saelens.py
	$(PY) benchmarks/progress_fragment.py
	$(PY) benchmarks/fault_drill.py
	$(PY) benchmarks/trainer_throughput.py
	$(PY) benchmarks/extraction_throughput.py
	$(PY) benchmarks/ground_truth_recovery.py
	$(PY) benchmarks/downstream_minilm.py
	$(PY) benchmarks/architectures.py
	$(PY) benchmarks/architectures.py --generator saelens
	$(PY) benchmarks/architectures.py --combine benchmarks/results/architectures.json benchmarks/results/architectures_synthsaebench.json
	$(PY) benchmarks/aux_window_minilm.py
	$(PY) benchmarks/sweep_throughput.py
	$(PY) benchmarks/stream_vs_extract.py
	$(PY) benchmarks/stream_vs_saelens.py --saelens-prefetch --train-tokens 409600

clean:
	rm -rf $(VENV) static/vendor
