# kdbench: `make run` runs the whole workflow on the embedded demo and writes results/report.html;
# `make test` runs lint and the test suite. Both create .venv with pip on first use.
PYTHON ?= python3
VENV   ?= .venv
CONFIG ?= config/demo.yaml
CORES  ?= all
BIN    := $(VENV)/bin
# pytest-xdist workers for `make test` (one test module per worker at a time)
TEST_WORKERS ?= 2
STAMP  := $(VENV)/.kdbench-installed

.PHONY: all venv run report test lint format dry-run clean

all: run

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "kdbench needs Python >= 3.11 (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG)
	$(BIN)/snakemake --cores 1 --configfile $(CONFIG) --report results/report.html
	@echo "report: results/report.html"

# the report of a finished workflow only: otherwise one line says what to run first
report: $(STAMP)
	@plan=$$($(BIN)/snakemake -n --configfile $(CONFIG) 2>&1) || { echo "$$plan" | tail -n 1 >&2; exit 1; }; \
	echo "$$plan" | grep -q '^Nothing to be done' || { echo "make report: $(CONFIG) has jobs \
	left to run: 'make run CONFIG=$(CONFIG)' first ('make dry-run CONFIG=$(CONFIG)' lists them)" >&2; exit 1; }
	$(BIN)/snakemake --cores 1 --configfile $(CONFIG) --report results/report.html

dry-run: $(STAMP)
	$(BIN)/snakemake -n --configfile $(CONFIG)

# `snakemake --lint` of each config (and of the demo in cohorts), LINT_JOBS at once, each one's
# output in one piece
LINT_JOBS ?= 2
SNAKE_LINTS := lint-demo lint-demo-cohorts lint-config lint-fashion lint-crd
.PHONY: $(SNAKE_LINTS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check .
	@$(MAKE) --no-print-directory -j $(LINT_JOBS) -O $(SNAKE_LINTS)

lint-demo lint-config lint-fashion lint-crd: lint-%: $(STAMP)
	$(BIN)/snakemake --lint --configfile config/$*.yaml

lint-demo-cohorts: $(STAMP)
	$(BIN)/snakemake --lint --configfile config/demo.yaml --config cohort_size=4

test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/snakefmt .

clean:
	rm -rf .snakemake results/state
