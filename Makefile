# Two entry points (see README): `make demo` runs the main job end to end (again: it replaces its own
# demo bundles), `make test` the tests.
# Both create .venv and install the project on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_MODELS := models/demo
# The tests run the Spark engine too (local mode, with the machine's Java), dbt (examples/dbt) and
# the documentation build (docs: MkDocs); `make install EXTRAS=test` leaves them out.
EXTRAS ?= test,spark,dbt,docs
export HF_HUB_OFFLINE := 1

.PHONY: install demo test docs fixtures clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, as the CPU wheel on this machine: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/anime-udf train baseline --data fixtures/catalog.csv --out $(DEMO_MODELS)/baseline-fixture --force
	$(BIN)/anime-udf train fusion --data fixtures/catalog.csv --out $(DEMO_MODELS)/fusion-fixture --force
	$(BIN)/anime-udf sql --models $(DEMO_MODELS) --table anime=fixtures/holdout.csv \
	  "WITH scored AS (SELECT anime_id, predict_score(synopsis, genres, studio, episodes) AS baseline, \
	                          predict_score_fusion(synopsis, genres, studio, episodes) AS fusion FROM anime) \
	   SELECT a.anime_id, a.title, a.genres, a.score, round(s.baseline, 2) AS baseline, round(s.fusion, 2) AS fusion \
	   FROM anime a JOIN scored s USING (anime_id) ORDER BY s.fusion DESC LIMIT 8"
	$(BIN)/anime-udf eval --models $(DEMO_MODELS) --data fixtures/holdout.csv --report $(DEMO_MODELS)/report.html

test: install
	$(BIN)/python -m pytest -q

# The documentation site, built offline into site/ (open site/index.html); the CLI reference is
# generated from the click commands. --strict: a broken link or anchor fails the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

fixtures: install
	$(BIN)/python fixtures/make_catalog.py

clean:
	rm -rf $(VENV) $(DEMO_MODELS)
