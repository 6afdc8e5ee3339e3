# The front door: `make run` and `make test` set everything up themselves and are idempotent.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8000
PROXY_PORT ?= 8080
# make tracking-server: an MLflow server for a team (README "Scaling out"). The SQL backend
# holds runs and the registry; artifacts are proxied (clients need no storage credentials).
TRACKING_HOST ?= 127.0.0.1
TRACKING_PORT ?= 5000
TRACKING_BACKEND ?= sqlite:///mlflow-server.db
TRACKING_ARTIFACTS ?= mlartifacts
TRACKING_WORKERS ?= 2

# Stages call `python -m chestct.stages.*`: put the project's environment first on PATH.
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: venv run repro plan test serve serve-proxy lint format ui tracking-server docs clean help

help:
	@echo "make run    - set up .venv and run the whole pipeline (dvc repro)"
	@echo "make plan   - print which stages 'dvc repro' would rerun, and why; run nothing"
	@echo "make repro  - check params and the tracking store, then dvc repro \$$ARGS"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make serve  - serve model/ with gunicorn on http://$(HOST):$(PORT)"
	@echo "make serve-proxy - nginx on http://$(HOST):$(PROXY_PORT) in front of gunicorn on 127.0.0.1:$(PORT)"
	@echo "make ui     - the MLflow UI on the local sqlite store (http://$(HOST):5000; PORT=)"
	@echo "make tracking-server - MLflow server (SQL backend, proxied artifacts) on $(TRACKING_HOST):$(TRACKING_PORT)"
	@echo "make lint   - ruff"
	@echo "make docs   - build the docs site into site/ (mkdocs build --strict)"

# dvc plots show's page template with the Vega scripts inlined (npm registry, at set-up): its
# charts then need no network (.dvc/config plots.html_template; docs/tracking.md).
PLOTS_TEMPLATE := build/plots/template.html
$(PLOTS_TEMPLATE): config/plots/package-lock.json src/chestct/evaluation/plotpage.py | $(STAMP)
	npm ci --prefix config/plots --no-audit --no-fund --loglevel=error
	$(BIN)/python -m chestct.evaluation.plotpage config/plots/node_modules $@

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else \
		"chestct needs Python 3.11; set PYTHON=/path/to/python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

venv: $(STAMP) $(PLOTS_TEMPLATE)

# DVC deletes a stage's outputs before running it: check what a stage would check first, so
# that a params typo or an unreachable tracking server stops here with artifacts/ untouched.
# chestct.cli.repro runs `dvc repro` under one parent MLflow run (the stages' runs nest under it).
run: venv
	python -m chestct.cli.preflight
	python -m chestct.cli.repro
	@echo
	@echo "Pipeline done. Promotion decision:"
	@python -c 'import json; d=json.load(open("artifacts/promote/decision.json")); print("  " + d["reason"])'
	@echo "Next:"
	@echo "  make serve                                   # serve model/ on http://$(HOST):$(PORT)"
	@echo "  $(VENV)/bin/python -m chestct.cli.samples            # writes slice.png and slice.dcm here"
	@echo "  curl -F file=@slice.png http://$(HOST):$(PORT)/predict"
	@echo "  $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   # compare runs"

# `make repro ARGS="train"` or ARGS="-s train": dvc repro with the same check as `make run`.
repro: venv
	python -m chestct.cli.preflight $(ARGS)
	python -m chestct.cli.repro $(ARGS)

# What `dvc repro` would rerun, including the downstream stages `dvc repro --dry` leaves out.
plan: venv
	@python -m chestct.cli.plan

test: venv
	python -m pytest $(PYTEST_ARGS)

# The docs site (docs/, mkdocs.yml) into site/, after rendering the measured tables of docs/results/;
# --strict fails on any broken link, left-out page or missing table. The pipeline diagram is
# drawn in the browser by mermaid, which material would fetch from unpkg.com when a page is
# viewed; installed here from the npm registry (npm checks the package's sha512, the pin below
# the file's sha256), the site draws it offline. The file is git-ignored.
MERMAID_VERSION := 11.6.0
MERMAID_SHA256 := 3a93016a73dc82ba890d919f9bbb176f3da9d98341650c0b517f2595cc68fef8
MERMAID_JS := docs/assets/vendor/mermaid.min.js
docs: venv $(MERMAID_JS)
	python bench/docsgen.py
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict

$(MERMAID_JS):
	@command -v npm >/dev/null || { echo "make docs needs npm (Debian: apt-get install npm) to install mermaid"; exit 1; }
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  (cd "$$tmp" && npm pack --silent mermaid@$(MERMAID_VERSION) >/dev/null && \
	   tar -xzf mermaid-$(MERMAID_VERSION).tgz package/dist/mermaid.min.js && \
	   echo "$(MERMAID_SHA256)  package/dist/mermaid.min.js" | sha256sum --check --quiet) && \
	  mkdir -p $(@D) && mv "$$tmp/package/dist/mermaid.min.js" $@.tmp && mv $@.tmp $@

serve: venv
	@test -f model/model.json || { echo "no model in model/: run 'make run' first"; exit 1; }
	CHESTCT_BIND=$(HOST):$(PORT) gunicorn -c config/gunicorn.conf.py app:app

# nginx (Debian's package) buffering requests in front of gunicorn, as compose and Kubernetes
# deploy it (docs/serving-hardening.md); gunicorn listens on 127.0.0.1 only.
serve-proxy: venv
	@test -f model/model.json || { echo "no model in model/: run 'make run' first"; exit 1; }
	python -m chestct.serving.proxy --host $(HOST) --port $(PROXY_PORT) --upstream-port $(PORT)

# PORT/HOST given on the command line or in the environment win; else MLflow's usual 5000.
UI_PORT := $(if $(filter command line environment,$(origin PORT)),$(PORT),5000)
ui: venv
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host $(HOST) --port $(UI_PORT)

# The server's job runner (GenAI evaluation jobs, unused by chestct) would start ~5 more
# processes: off.
tracking-server: venv
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --backend-store-uri '$(TRACKING_BACKEND)' \
		--serve-artifacts --artifacts-destination '$(TRACKING_ARTIFACTS)' \
		--host $(TRACKING_HOST) --port $(TRACKING_PORT) --workers $(TRACKING_WORKERS)

lint: venv
	ruff check .
	ruff format --check .

format: venv
	ruff format .
	ruff check --fix .

clean:
	rm -rf artifacts model mlflow.db mlruns mlartifacts
