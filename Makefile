# shardlab: two commands for learners (make lab, make test), a few for maintainers.
#
# Outside conda, everything runs in ./.venv, created and updated on demand.
# Inside an activated conda environment (conda env create -f environment.yml),
# the environment's own python is used and no venv is made.

PYTHON ?= python3
LAB_ARGS ?=
NBVAL = --nbval --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg

ifneq ($(CONDA_PREFIX),)
ifneq ($(CONDA_DEFAULT_ENV),base)
USE_VENV ?= no
endif
endif
USE_VENV ?= yes

ifeq ($(USE_VENV),yes)
BIN := .venv/bin/
STAMP := .venv/.shardlab-installed
else
BIN :=
STAMP :=
endif

.PHONY: lab test test-unit test-notebooks notebooks venv clean bench pg-up pg-down test-pg kill-matrix test-browser migrate

venv: $(STAMP)

.venv/.shardlab-installed: pyproject.toml
	test -x .venv/bin/python || $(PYTHON) -m venv .venv
	.venv/bin/python -m pip install --quiet --upgrade pip
	.venv/bin/python -m pip install --quiet -e ".[test,postgres]"
	touch $@

# JupyterLab refuses to start as root (containers, CI) without --allow-root.
ROOT_FLAG := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)

lab: venv
	$(BIN)python -m jupyter lab --notebook-dir=notebooks $(ROOT_FLAG) $(LAB_ARGS)

test: test-unit test-notebooks

test-unit: venv
	$(BIN)python -m pytest -q tests

test-notebooks: venv
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then \
		$(BIN)python -c "import matplotlib.pyplot" && \
		$(BIN)python -m pytest -q $(NBVAL) notebooks/; \
	else echo "no notebooks yet"; fi

# Re-execute every notebook in place (fresh kernel each). The only way outputs change.
notebooks: venv
	$(BIN)python tools/run_notebooks.py $(NB)

# Every shard to the schema head with Alembic (SQLite files in shard_data/, or $SHARDLIB_URLS).
# Any Alembic command on all shards or one: $(BIN)python -m shardlib.migrations [--shard asia] current
migrate: venv
	$(BIN)python -m shardlib.migrations upgrade head

# Real PostgreSQL shards: make pg-up, export the printed lines, make test-pg.
pg-up:
	@bash scripts/pg.sh up

pg-down:
	@bash scripts/pg.sh down

test-pg: venv
	@if [ -z "$$SHARDLIB_URLS" ]; then \
		echo "SHARDLIB_URLS is not set: run 'make pg-up' and export the lines it prints" >&2; exit 2; fi
	$(BIN)python -m pytest -q tests

# SIGKILL two-phase commits (coordinator, participant servers) at every protocol point; prints the matrix.
kill-matrix: venv
	@if [ -z "$$SHARDLIB_URLS" ]; then \
		echo "SHARDLIB_URLS is not set: run 'make pg-up' and export the lines it prints" >&2; exit 2; fi
	$(BIN)python scripts/kill_matrix.py

# Every notebook run in JupyterLab in headless Chromium, from the menus, as a learner would.
# Needs Debian's chromium (apt-get install -y chromium); screenshots in artifacts/screenshots/.
test-browser: venv
	@$(BIN)python -c "import playwright" 2>/dev/null || $(BIN)python -m pip install --quiet -e ".[browser]"
	@test -x "$${SHARDLAB_CHROMIUM:-/usr/bin/chromium}" || { echo "Chromium not found: apt-get install -y chromium" >&2; exit 2; }
	$(BIN)python -m pytest -q -m browser tests/browser

bench: venv
	@for b in benchmarks/[!_]*.py; do echo "== $$b"; $(BIN)python $$b || exit 1; done

clean:
	rm -rf notebooks/shard_data shard_data artifacts .pytest_cache
