"""The path a user meets first: each command in a fresh process, with an empty embedding cache and
both models, DuckDB free to call the two scoring functions from several threads at once.

(`explain` with both models on a cold cache once died every time: two DuckDB threads loaded the two
encoders at once, and transformers' lazy imports are not thread safe. Warm caches hid it.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pytest

from anime_udf.scoring import load_scorer
from anime_udf.sqlutil import quote_literal
from tests.conftest import BF16_TOLERANCE, HOLDOUT, ROOT

pytestmark = pytest.mark.slow  # fresh processes: each loads torch and both encoders

ANIME_UDF = str(Path(sys.executable).parent / "anime-udf")
FUNCTIONS = ("predict_score", "predict_score_fusion")


@pytest.fixture
def user(tmp_path, baseline_bundle, fusion_bundle) -> dict[str, str]:
    """A new user's environment: both models in the models directory, an embedding cache not yet made."""
    models = tmp_path / "models"
    for bundle in (baseline_bundle, fusion_bundle):
        shutil.copytree(bundle, models / bundle.name)
    cache = tmp_path / "fresh-cache"
    assert not cache.exists()
    return {**os.environ, "ANIME_UDF_MODELS": str(models), "ANIME_UDF_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
            "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}


def run(env: dict[str, str], *args: str, command: tuple[str, ...] = (ANIME_UDF,), cwd: Path | None = None) -> str:
    result = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def expected(baseline_bundle, fusion_bundle) -> pl.DataFrame:
    """The holdout's scores computed here, in fp32, in another process than the command's."""
    holdout = pl.read_csv(HOLDOUT)
    inputs = [holdout[c].to_list() for c in ("synopsis", "genres", "studio", "episodes")]
    scores = {name: load_scorer(bundle, precision="fp32").predict(*inputs)
              for name, bundle in zip(FUNCTIONS, (baseline_bundle, fusion_bundle))}
    return holdout.select("anime_id").with_columns(**scores)


def assert_scores(df: pl.DataFrame, expected: pl.DataFrame) -> None:
    """Every holdout row scored by both models, at the bf16 contract's tolerance (auto precision may be bf16)."""
    joined = expected.join(df, on="anime_id", suffix="_got")
    assert joined.height == expected.height == df.height
    for name in FUNCTIONS:
        assert (joined[name] - joined[f"{name}_got"]).abs().max() <= BF16_TOLERANCE


def test_score(user, expected, tmp_path):
    run(user, "score", "--data", str(HOLDOUT), "--out", str(tmp_path / "scored.parquet"))
    assert_scores(pl.read_parquet(tmp_path / "scored.parquet"), expected)


def test_eval(user):
    metrics = json.loads(run(user, "eval", "--data", str(HOLDOUT), "--json"))
    assert {row["model"] for row in metrics} >= {"baseline", "fusion"}
    assert all(0 < row["mae"] < 3 for row in metrics)


def test_explain(user, expected, tmp_path):
    run(user, "explain", "--data", str(HOLDOUT), "--out", str(tmp_path / "parts.parquet"))
    parts = pl.read_parquet(tmp_path / "parts.parquet")
    assert parts.group_by("model").len()["len"].to_list() == [expected.height] * 2
    scores = parts.pivot(on="model", index="anime_id", values="score")
    assert_scores(scores.rename({"baseline": FUNCTIONS[0], "fusion": FUNCTIONS[1]}), expected)


@pytest.mark.parametrize("query", [
    "SELECT anime_id, predict_score(synopsis, genres, studio, episodes) AS predict_score, "
    "predict_score_fusion(synopsis, genres, studio, episodes) AS predict_score_fusion FROM anime",
    "SELECT anime_id, first(s) FILTER (WHERE f = 'b') AS predict_score, first(s) FILTER (WHERE f = 'f') "
    "AS predict_score_fusion FROM (SELECT anime_id, 'b' AS f, predict_score(synopsis, genres, studio, episodes) "
    "AS s FROM anime UNION ALL SELECT anime_id, 'f', predict_score_fusion(synopsis, genres, studio, episodes) "
    "FROM anime) GROUP BY anime_id",
], ids=["one-select", "union-all"])
def test_sql_with_both_functions(user, expected, tmp_path, query):
    run(user, "sql", "--table", f"anime={HOLDOUT}", "--out", str(tmp_path / "out.parquet"), query)
    assert_scores(pl.read_parquet(tmp_path / "out.parquet"), expected)


def test_rescore(user, expected, tmp_path):
    report = json.loads(run(user, "rescore", "--catalog", str(HOLDOUT), "--store", str(tmp_path / "store.duckdb"),
                            "--export", str(tmp_path / "scores.parquet"), "--json"))
    assert report["status"] == "ok", report
    scores = pl.read_parquet(tmp_path / "scores.parquet")
    wide = scores.pivot(on="model", index="anime_id", values="score")
    assert_scores(wide.rename({"baseline": FUNCTIONS[0], "fusion": FUNCTIONS[1]}), expected)


def test_dbt_plugin(user, expected, tmp_path):
    pytest.importorskip("dbt.adapters.duckdb", reason="the dbt extra: pip install 'anime-udf[dbt]'")
    project = shutil.copytree(ROOT / "examples" / "dbt", tmp_path / "project")
    warehouse = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(warehouse)) as con:
        con.execute(f"CREATE TABLE anime AS SELECT * FROM read_csv({quote_literal(HOLDOUT)})")
    # Run from another directory than the project's, with the paths relative to it, as after the
    # README's `export ANIME_UDF_MODELS=...`: relative paths are the working directory's everywhere.
    models = Path(user["ANIME_UDF_MODELS"])
    env = {**user, "ANIME_UDF_WAREHOUSE": warehouse.name, "ANIME_UDF_MODELS": models.name}
    run(env, "run", "--select", "anime_scores", "--project-dir", str(project), "--profiles-dir", str(project),
        command=(sys.executable, "-c", "from dbt.cli.main import cli; cli()"), cwd=models.parent)
    with duckdb.connect(str(warehouse), read_only=True) as con:
        table = con.sql("SELECT * FROM anime_scores").pl()
    assert_scores(table.rename({"baseline": FUNCTIONS[0], "fusion": FUNCTIONS[1]}), expected)


def test_an_unusable_cache_is_a_one_line_warning(user, tmp_path):
    (tmp_path / "afile").write_text("")
    result = subprocess.run([ANIME_UDF, "sql", "SELECT predict_score('a', 'Action', NULL, 12) AS p"],
                            env={**user, "ANIME_UDF_CACHE": str(tmp_path / "afile")}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    [warning] = [line for line in result.stderr.splitlines() if line]
    assert warning.startswith("Warning: embedding cache ") and warning.endswith("continuing without it")
