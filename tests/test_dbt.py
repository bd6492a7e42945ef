"""The dbt-duckdb plugin (anime_udf/dbt.py) and the example project (examples/dbt), run by real
`dbt build` / `dbt test` in a temporary copy: one project built once for the session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl
import pytest
from click.testing import CliRunner

from anime_udf.cli import cli
from anime_udf.sqlutil import quote_literal
from tests.conftest import CATALOG, ROOT

pytestmark = pytest.mark.slow  # dbt runs

pytest.importorskip("dbt.adapters.duckdb", reason="the dbt extra: pip install 'anime-udf[dbt]'")

CHANGED = (1, 2, 3)  # synopses edited before the second build
ADDED = (100001, 100002)  # rows added before the second build
REMOVED = 4  # a key deleted before the second build


@dataclass
class Build:
    invocation_id: str
    results: dict[str, str]  # node unique_id -> status
    table: pl.DataFrame  # anime_scores
    incremental: pl.DataFrame  # anime_scores_incremental


@dataclass
class Project:
    directory: Path
    warehouse: Path
    scored: pl.DataFrame  # `anime-udf score` of the catalog, before any dbt run
    first: Build
    second: Build
    third: Build  # after the baseline bundle was replaced by another model
    dbt_test: subprocess.CompletedProcess


def dbt(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from dbt.cli.main import cli; cli()", *args,
               "--project-dir", str(project), "--profiles-dir", str(project)]
    return subprocess.run(command, cwd=project, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=600)


def read_build(project: Path, warehouse: Path) -> Build:
    run_results = json.loads((project / "target" / "run_results.json").read_text())
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        table = con.sql("SELECT * FROM anime_scores ORDER BY anime_id").pl()
        incremental = con.sql("SELECT * FROM anime_scores_incremental ORDER BY anime_id").pl()
    finally:
        con.close()
    return Build(run_results["metadata"]["invocation_id"],
                 {r["unique_id"]: r["status"] for r in run_results["results"]}, table, incremental)


@pytest.fixture(scope="session")
def project(tmp_path_factory, session_cache, baseline_bundle, fusion_bundle) -> Project:
    """examples/dbt in a temporary directory over a warehouse holding the fixture catalog: scored
    by `anime-udf score`, built, edited (3 synopses changed, 2 rows added, 1 removed), built
    again, built with a new baseline bundle (its scores 0.5 higher), and tested."""
    root = tmp_path_factory.mktemp("dbt")
    directory = shutil.copytree(ROOT / "examples" / "dbt", root / "project")
    models = root / "models"
    for bundle in (baseline_bundle, fusion_bundle):
        shutil.copytree(bundle, models / bundle.name)
    warehouse = root / "warehouse.duckdb"
    con = duckdb.connect(str(warehouse))
    con.execute(f"CREATE TABLE anime AS SELECT * FROM read_csv({quote_literal(CATALOG)})")
    con.close()
    env = {"ANIME_UDF_MODELS": str(models), "ANIME_UDF_WAREHOUSE": str(warehouse),
           "ANIME_UDF_CACHE": str(session_cache), "HF_HUB_OFFLINE": "1", "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}

    out = root / "scored.parquet"
    result = CliRunner().invoke(cli, ["score", "--data", f"{warehouse}:anime", "--out", str(out)], env=env,
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output

    built = dbt(directory, env, "build")
    assert built.returncode == 0, built.stdout + built.stderr
    first = read_build(directory, warehouse)

    con = duckdb.connect(str(warehouse))
    con.execute(f"UPDATE anime SET synopsis = synopsis || ' Then the sea rises.' WHERE anime_id IN {CHANGED}")
    con.execute(f"INSERT INTO anime SELECT anime_id + 100000, title, 'A show first aired tonight.', genres, studio, "
                f"episodes, score FROM anime WHERE anime_id IN {tuple(a - 100000 for a in ADDED)}")
    con.execute(f"DELETE FROM anime WHERE anime_id = {REMOVED}")
    con.close()
    built = dbt(directory, env, "build")
    assert built.returncode == 0, built.stdout + built.stderr
    second = read_build(directory, warehouse)

    manifest_path = models / baseline_bundle.name / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["target"]["mean"] += 0.5  # another model: a new model id, every score 0.5 higher
    manifest_path.write_text(json.dumps(manifest))
    built = dbt(directory, env, "build")
    assert built.returncode == 0, built.stdout + built.stderr
    third = read_build(directory, warehouse)

    return Project(directory, warehouse, pl.read_parquet(out), first, second, third, dbt(directory, env, "test"))


def catalog_keys(warehouse: Path) -> list[int]:
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        return [r[0] for r in con.execute("SELECT anime_id FROM anime ORDER BY anime_id").fetchall()]
    finally:
        con.close()


def test_table_model_scores_equal_anime_udf_score(project):
    table, scored = project.first.table, project.scored.sort("anime_id")
    assert table["anime_id"].to_list() == scored["anime_id"].to_list() and table.height == 400
    for column, function in (("baseline", "predict_score"), ("fusion", "predict_score_fusion")):
        assert (table[column] - scored[function]).abs().max() <= 1e-6
    assert all(status in ("success", "pass") for status in project.first.results.values())


def test_second_build_scores_exactly_the_changed_and_new_rows(project):
    first, second = project.first, project.second
    assert first.incremental["scored_by_invocation"].unique().to_list() == [first.invocation_id]
    rescored = second.incremental.filter(pl.col("scored_by_invocation") == second.invocation_id)
    assert sorted(rescored["anime_id"].to_list()) == sorted((*CHANGED, *ADDED))  # 5 rows: no more, no fewer
    assert second.incremental["anime_id"].to_list() == catalog_keys(project.warehouse)  # the removed key is gone
    kept = second.incremental.filter(pl.col("scored_by_invocation") == first.invocation_id)
    assert kept.height == 400 - len(CHANGED) - 1
    assert kept.equals(first.incremental.filter(pl.col("anime_id").is_in(kept["anime_id"].implode())))
    # Every incremental score, reused or new, is what the table model (all rows, rescored) says.
    joined = second.incremental.join(second.table, on="anime_id", suffix="_table")
    assert joined.height == second.table.height == 401
    for column in ("baseline", "fusion"):
        assert (joined[column] - joined[f"{column}_table"]).abs().max() <= 1e-6
    edited = joined.filter(pl.col("anime_id").is_in(CHANGED))
    before = first.table.filter(pl.col("anime_id").is_in(CHANGED))
    assert (edited.sort("anime_id")["fusion"] - before["fusion"]).abs().max() > 0  # new inputs, new scores


def test_a_new_bundle_rescores_every_row(project):
    """The incremental model compares the bundles' model ids too: a retrained model rescores."""
    second, third = project.second.incremental, project.third.incremental
    assert third["scored_by_invocation"].unique().to_list() == [project.third.invocation_id]
    assert third["anime_id"].to_list() == second["anime_id"].to_list() and third.height == 401
    assert third["model_ids"].n_unique() == 1 and third["model_ids"][0] != second["model_ids"][0]
    unclamped = second["baseline"] < 9.5
    assert ((third["baseline"] - second["baseline"]).filter(unclamped) - 0.5).abs().max() <= 1e-6
    assert (third["fusion"] - second["fusion"]).abs().max() <= 1e-6


def test_incremental_hashes_and_model_ids_are_those_of_rescore(project, baseline_bundle, fusion_bundle):
    """The incremental model compares the input hash of sql/rescore.sql and the model ids of
    `anime-udf rescore`."""
    from anime_udf.rescore import model_id, sql_sections

    con = duckdb.connect()
    con.execute(sql_sections()["macros"])
    con.execute(f"ATTACH {quote_literal(project.warehouse)} AS w (READ_ONLY)")
    expected = dict(con.execute("SELECT anime_id, rescore_input_hash(synopsis, genres, studio, episodes) "
                                "FROM w.anime").fetchall())
    con.close()
    assert dict(project.second.incremental.select("anime_id", "input_hash").iter_rows()) == expected
    assert project.second.incremental["model_ids"].unique().to_list() == [
        f"{model_id(baseline_bundle)},{model_id(fusion_bundle)}"]


def test_dbt_test_passes(project):
    assert project.dbt_test.returncode == 0, project.dbt_test.stdout
    results = json.loads((project.directory / "target" / "run_results.json").read_text())["results"]
    statuses = {r["unique_id"].split(".")[2]: r["status"] for r in results}
    assert {"models_beat_the_mean", "scores_in_range"} <= set(statuses)  # the singular tests ran
    assert set(statuses.values()) == {"pass"} and len(statuses) == 11


def test_plugin_registers_without_torch_until_a_function_is_called(tmp_path, baseline_bundle):
    """The plugin gives every dbt connection the functions and the macros, and imports neither
    torch nor transformers until a function is called."""
    code = f"""
import sys, duckdb
from dbt.adapters.duckdb.plugins import BasePlugin
plugin = BasePlugin.create("anime_udf.dbt", config={{"baseline": {str(baseline_bundle)!r}, "device": "cpu"}})
con = duckdb.connect()
plugin.configure_connection(con)
cursor = con.cursor()
plugin.configure_cursor(cursor)
row = cursor.execute("SELECT rescore_input_hash('A story.', 'Action', NULL, 12), mae(score, 5), "
                     "rmse(score, 5) FROM (VALUES (6.0), (7.0)) t(score)").fetchone()
print(row[0][:8], row[1], row[2], *(m in sys.modules for m in ("torch", "transformers")))
print(cursor.execute("SELECT predict_score('A story.', 'Action', NULL, 12)").fetchone()[0],
      *(m in sys.modules for m in ("torch", "transformers")))
print(cursor.execute("SELECT explain_score('A story.', 'Action', NULL, 12).score").fetchone()[0])
print(*cursor.execute("SELECT i.lo, i.hi FROM (SELECT predict_score_interval('A story.', 'Action', NULL, 12, 0.9) AS i)")
      .fetchone())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    before, after, explained, interval = (line.split() for line in result.stdout.splitlines()[-4:])
    assert before[1:] == ["1.5", str(((1 + 4) / 2) ** 0.5), "False", "False"]
    # The call loaded the model (torch); transformers too, unless the synopsis's embedding was cached.
    assert 1 <= float(after[0]) <= 10 and after[1] == "True"
    assert float(explained[0]) == pytest.approx(float(after[0]), abs=1e-5)  # explain_score is there too
    lo, hi = map(float, interval)  # and the interval, around the score
    assert 1 <= lo < float(after[0]) < hi <= 10


def test_plugin_settings_are_checked():
    from dbt.adapters.duckdb.plugins import BasePlugin

    from anime_udf.dbt import PluginError

    with pytest.raises(PluginError, match="anime_udf.dbt: unknown setting.*modles.*models, baseline, fusion"):
        BasePlugin.create("anime_udf.dbt", config={"modles": "x"})
    with pytest.raises(PluginError, match="anime_udf.dbt: no model bundles in"):
        BasePlugin.create("anime_udf.dbt", config={"models": "empty"})


@pytest.mark.parametrize("mistake, message", [
    ("missing models directory", "anime_udf.dbt: no model bundles in {models}"),
    ("empty models directory", "anime_udf.dbt: no model bundles in {models}"),
    ("unknown setting", "anime_udf.dbt: unknown setting(s) devcie; its settings are models, baseline"),
])
def test_a_plugin_mistake_is_one_line_naming_it(tmp_path, mistake, message):
    """dbt prints its own errors as a message; any other exception from the plugin as 270 lines of traceback."""
    directory = shutil.copytree(ROOT / "examples" / "dbt", tmp_path / "project")
    models = tmp_path / "models"
    if mistake == "empty models directory":
        models.mkdir()
    if mistake == "unknown setting":
        profiles = directory / "profiles.yml"
        profiles.write_text(profiles.read_text().replace("device: auto", "devcie: auto"))
    env = {"ANIME_UDF_MODELS": str(models), "ANIME_UDF_WAREHOUSE": str(tmp_path / "warehouse.duckdb"),
           "HF_HUB_OFFLINE": "1", "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}
    result = dbt(directory, env, "build")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output
    expected = message.format(models=models)
    assert len([line for line in output.splitlines() if expected in line]) == 1, output
