"""The Spark engine (anime_udf/spark.py, anime_udf/rescore/on_spark.py) in local mode: the
same scores as the DuckDB functions, the same errors, and the nightly rescoring's
semantics over a Parquet snapshot store. One SparkSession for the module."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

pytest.importorskip("pyspark", reason="the spark extra is not installed (pip install 'anime-udf[spark]')")

import anime_udf  # noqa: E402
from anime_udf import spark as spark_udf  # noqa: E402
from anime_udf.catalog import read_catalog  # noqa: E402
from anime_udf.cli import cli  # noqa: E402
from anime_udf.explain import fields as fields_of  # noqa: E402
from anime_udf.rescore import RescoreError, rescore  # noqa: E402
from anime_udf.rescore import on_spark as spark_rescoring  # noqa: E402
from anime_udf.rescore.on_spark import SNAPSHOTS, current_snapshot, rescore_spark  # noqa: E402
from tests.conftest import CATALOG, HOLDOUT, ROOT  # noqa: E402

# A Spark JVM (slow); this process reads the cache the executors read, so that the engines are
# compared on the same cached embeddings (every test starts cold otherwise).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("warm_cache")]

CALLS = {name: f"{name}(synopsis, genres, studio, episodes)" for name in ("predict_score", "predict_score_fusion")}
# Rows with missing and odd inputs (the NULL policy): episodes NULL, NaN, negative, huge.
EDGE_ROWS = [
    (-1, None, None, None, None),
    (-2, "", "", "", 0.0),
    (-3, "   \n\t ", "  ,  , ", "   ", -5.0),
    (-4, "A quiet story.", "NotAGenre, ALSO-NOT", "Totally Unknown Studio", 1e12),
    (-5, "x" * 5_000, " action ,DRAMA", "studio kestrel", float("nan")),
]


@pytest.fixture(scope="module")
def spark(session_cache, tmp_path_factory):
    """local[2], its workers on the tests' embedding cache (set as a cluster would set it)."""
    session = spark_udf.session("local[2]", app_name="anime-udf-tests", conf={
        "spark.executorEnv.ANIME_UDF_CACHE": str(session_cache),
        "spark.sql.warehouse.dir": str(tmp_path_factory.mktemp("spark-warehouse")),
    })
    yield session
    session.stop()


@pytest.fixture(scope="module")
def functions(spark, baseline_bundle, fusion_bundle):
    return spark_udf.register(spark, baseline=baseline_bundle, fusion=fusion_bundle)


@pytest.fixture(scope="module")
def anime(tmp_path_factory) -> Path:
    """The fixture hold-out and the edge rows as one Parquet file (episodes DOUBLE, as the SQL functions take it)."""
    holdout = read_catalog(HOLDOUT).select("anime_id", "synopsis", "genres", "studio",
                                           pl.col("episodes").cast(pl.Float64))
    edge = pl.DataFrame(EDGE_ROWS, schema=holdout.schema, orient="row")
    path = tmp_path_factory.mktemp("anime") / "anime.parquet"
    pl.concat([holdout, edge]).write_parquet(path)
    return path


def duckdb_scores(baseline_bundle, fusion_bundle, query: str, anime: Path) -> pl.DataFrame:
    con = duckdb.connect()
    anime_udf.register(con, baseline=baseline_bundle, fusion=fusion_bundle)
    con.register("anime", pl.read_parquet(anime))
    return con.sql(query).pl()


def spark_sql(spark, query: str, anime: Path) -> pl.DataFrame:
    spark.read.parquet(str(anime)).createOrReplaceTempView("anime")
    return pl.from_arrow(spark.sql(query).toArrow())


def assert_same(spark_df: pl.DataFrame, duck_df: pl.DataFrame, key: str, columns) -> None:
    joined = spark_df.join(duck_df, on=key, suffix="_duckdb")
    assert joined.height == duck_df.height == spark_df.height
    for c in columns:
        assert joined[c].null_count() == 0
        np.testing.assert_allclose(joined[c].to_numpy(), joined[f"{c}_duckdb"].to_numpy(), rtol=0, atol=1e-6)


def test_both_functions_score_as_on_duckdb_nulls_included(spark, functions, anime, baseline_bundle, fusion_bundle):
    query = f"SELECT anime_id, {CALLS['predict_score']} AS b, {CALLS['predict_score_fusion']} AS f FROM anime"
    on_spark = spark_sql(spark, query, anime)
    assert_same(on_spark, duckdb_scores(baseline_bundle, fusion_bundle, query, anime), "anime_id", ["b", "f"])
    assert on_spark.filter(pl.col("anime_id") < 0).height == len(EDGE_ROWS)
    assert on_spark.select(pl.col("b", "f").is_between(1, 10).all()).row(0) == (True, True)
    # the returned column functions, in the DataFrame API
    df = spark.read.parquet(str(anime))
    api = pl.from_arrow(df.select("anime_id", functions["predict_score_fusion"]("synopsis", "genres", "studio",
                                                                               "episodes").alias("f")).toArrow())
    assert_same(api, on_spark.select("anime_id", "f"), "anime_id", ["f"])


def test_constant_arguments_are_scored_per_row_as_on_duckdb(spark, functions, anime, baseline_bundle, fusion_bundle):
    query = ("SELECT anime_id, predict_score('A story of war.', 'Action', NULL, 12) AS constant, "
             "predict_score_fusion(synopsis, 'Action', NULL, 12) AS mixed FROM anime")
    on_spark = spark_sql(spark, query, anime)
    assert_same(on_spark, duckdb_scores(baseline_bundle, fusion_bundle, query, anime), "anime_id",
                ["constant", "mixed"])
    # one value for the constant call (up to float noise between batches); the varying column still varies
    assert on_spark["constant"].max() - on_spark["constant"].min() <= 1e-6 and on_spark["mixed"].n_unique() > 1


def test_explaining_functions_give_the_structs_duckdb_gives(spark, functions, anime, baseline_bundle, fusion_bundle):
    """explain_score / explain_score_fusion, registered beside the scoring functions: the same
    parts on both engines, edge rows included."""
    fields = {"b": fields_of("baseline"), "f": fields_of("fusion")}
    query = ("SELECT anime_id, explain_score(synopsis, genres, studio, episodes) AS b, "
             "explain_score_fusion(synopsis, genres, studio, episodes) AS f FROM anime")
    flat = [pl.col(c).struct.field(f).alias(f"{c}_{f}") for c, names in fields.items() for f in names]
    on_spark = spark_sql(spark, query, anime).select("anime_id", *flat)
    on_duckdb = duckdb_scores(baseline_bundle, fusion_bundle, query, anime).select("anime_id", *flat)
    assert_same(on_spark, on_duckdb, "anime_id", [c for c in on_spark.columns if c != "anime_id"])
    assert on_spark.height == on_duckdb.height > len(EDGE_ROWS)
    # in the DataFrame API, by name (register returns the scoring functions)
    from pyspark.sql import functions as F

    df = spark.read.parquet(str(anime))
    api = pl.from_arrow(df.select("anime_id", F.call_function("explain_score_fusion", *(
        df[c] for c in ("synopsis", "genres", "studio", "episodes"))).alias("f")).toArrow())
    api = api.select("anime_id", *(pl.col("f").struct.field(f).alias(f"f_{f}") for f in fields["f"]))
    assert_same(api, on_spark.select(api.columns), "anime_id", api.columns[1:])


def test_interval_functions_give_the_intervals_duckdb_gives(spark, functions, anime, baseline_bundle, fusion_bundle):
    """predict_score_interval / predict_score_fusion_interval, a level constant or per row, edge rows included."""
    query = ("SELECT anime_id, predict_score_interval(synopsis, genres, studio, episodes, 0.9) AS b, "
             "predict_score_fusion_interval(synopsis, genres, studio, episodes, "
             "CASE WHEN anime_id % 2 = 0 THEN 0.5 ELSE 0.8 END) AS f FROM anime")
    flat = [pl.col(c).struct.field(f).alias(f"{c}_{f}") for c in ("b", "f") for f in ("lo", "hi")]
    on_spark = spark_sql(spark, query, anime).select("anime_id", *flat)
    assert_same(on_spark, duckdb_scores(baseline_bundle, fusion_bundle, query, anime).select("anime_id", *flat),
                "anime_id", [c for c in on_spark.columns if c != "anime_id"])
    assert on_spark.select((pl.col("b_lo") < pl.col("b_hi")).all(), pl.col("f_hi").le(10).all()).row(0) == (True, True)


def test_a_local_session_starts_its_jvm_with_room_for_a_million_rows(spark):
    """Local mode's executors share the driver's heap: session() gives it LOCAL_DRIVER_MEMORY
    (Spark's own 1 GB ran out at a million rows), as the JVM's own maximum heap shows."""
    assert spark.sparkContext.getConf().get("spark.driver.memory") == spark_udf.LOCAL_DRIVER_MEMORY
    assert spark.sparkContext._jvm.java.lang.Runtime.getRuntime().maxMemory() > 3 * 2 ** 30


def test_the_local_driver_memory_gives_way_to_the_callers_setting(monkeypatch):
    monkeypatch.delenv("PYSPARK_SUBMIT_ARGS", raising=False)
    memory = [spark_udf.session_settings(master, False, conf).get("spark.driver.memory")
              for master, conf in [("local[2]", None), ("local[2]", {"spark.driver.memory": "12g"}),
                                   ("spark://host:7077", None)]]
    assert memory == [spark_udf.LOCAL_DRIVER_MEMORY, "12g", None]
    monkeypatch.setenv("PYSPARK_SUBMIT_ARGS", "--driver-memory 8g pyspark-shell")
    assert "spark.driver.memory" not in spark_udf.session_settings("local[*]", False, None)
    said = f"{spark_udf.LOCAL_DRIVER_MEMORY.removesuffix('g')} GB"  # what --help and docs/spark.md say
    help_text = " ".join(CliRunner().invoke(cli, ["rescore", "--help"]).output.split())
    assert f"JVM gets {said} of heap" in help_text and f"JVM {said} of heap" in (
        " ".join((ROOT / "docs" / "spark.md").read_text().split()))


def test_a_wrong_column_type_names_the_function_and_its_signature(spark, functions, anime):
    from pyspark.errors import PythonException

    with pytest.raises(PythonException) as caught:
        spark_sql(spark, "SELECT predict_score(synopsis, genres, studio, 'twelve') FROM anime", anime)
    assert spark_udf.job_error(caught.value) == (
        "TypeError: predict_score: argument episodes has type string, expected a number; the signature is "
        "predict_score(synopsis STRING, genres STRING, studio STRING, episodes DOUBLE) -> DOUBLE")
    with pytest.raises(PythonException) as caught:
        spark_sql(spark, "SELECT predict_score_interval(synopsis, genres, studio, episodes, 'high') FROM anime", anime)
    assert spark_udf.job_error(caught.value) == (
        "TypeError: predict_score_interval: argument level has type string, expected a number; the signature is "
        "predict_score_interval(synopsis STRING, genres STRING, studio STRING, episodes DOUBLE, level DOUBLE) "
        "-> STRUCT")


def test_shipped_bundles_are_loaded_from_the_copy_spark_sends(spark, anime, tmp_path, baseline_bundle,
                                                              fusion_bundle):
    from pyspark import SparkFiles

    copy = shutil.copytree(baseline_bundle, tmp_path / "baseline-shipped")
    spark_udf.register(spark, baseline=copy, ship=True)
    shutil.rmtree(copy)  # the workers can only use what was shipped
    assert (Path(SparkFiles.get(spark_udf.shipped_name(copy))) / "manifest.json").is_file()
    query = f"SELECT anime_id, {CALLS['predict_score']} AS b FROM anime"
    assert_same(spark_sql(spark, query, anime), duckdb_scores(baseline_bundle, fusion_bundle, query, anime),
                "anime_id", ["b"])


def test_score_command_on_spark_writes_what_the_duckdb_score_writes(spark, tmp_path, baseline_bundle, fusion_bundle):
    data = tmp_path / "parts"
    data.mkdir()
    catalog = pl.read_csv(HOLDOUT)
    catalog.head(60).write_parquet(data / "a.parquet")
    catalog.tail(-60).write_parquet(data / "b.parquet")
    models = ["--model", baseline_bundle, "--model", fusion_bundle]
    run = CliRunner().invoke(cli, ["score", "--engine", "spark", "--data", str(data / "*.parquet"),
                                   "--out", "scored", *map(str, models)], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    assert f"scored {catalog.height} rows with predict_score, predict_score_fusion on Spark" in run.output
    duck = CliRunner().invoke(cli, ["score", "--data", str(HOLDOUT), "--out", "scored.parquet", *map(str, models)])
    assert duck.exit_code == 0, duck.output
    expected = pl.read_parquet("scored.parquet")
    on_spark = pl.read_parquet("scored/*.parquet")
    assert on_spark.columns == expected.columns  # the catalog's columns, then one per model
    assert_same(on_spark, expected, "anime_id", ["predict_score", "predict_score_fusion"])
    # a second run replaces the output; a directory that is not a Spark output is never replaced
    assert CliRunner().invoke(cli, ["score", "--engine", "spark", "--data", str(data / "a.parquet"), "--out",
                                    "scored", *map(str, models)]).exit_code == 0
    assert pl.read_parquet("scored/*.parquet").height == 60
    (tmp_path / "mine").mkdir()
    refused = CliRunner().invoke(cli, ["score", "--engine", "spark", "--data", str(data / "a.parquet"), "--out",
                                       "mine", *map(str, models)])
    assert refused.exit_code == 1 and "is not a Parquet directory written by Spark" in refused.output
    # a scored file scored again: its stale score column replaced, as on DuckDB (never predict_score_1)
    stale = expected.with_columns(predict_score=pl.lit(1.0))
    stale.write_parquet(tmp_path / "stale.parquet")
    again = CliRunner().invoke(cli, ["score", "--engine", "spark", "--data", str(tmp_path / "stale.parquet"),
                                     "--out", "rescored", *map(str, models)])
    assert again.exit_code == 0 and "replaced the input's predict_score, predict_score_fusion columns" in again.output
    rescored = pl.read_parquet("rescored/*.parquet")
    assert rescored.columns == expected.columns
    assert_same(rescored, expected, "anime_id", ["predict_score", "predict_score_fusion"])


def test_the_cli_imports_pyspark_only_to_run_on_spark():
    code = ("import sys\n"
            "from anime_udf.cli import cli\n"
            "for args in (['--help'], ['score', '--help'], ['rescore', '--help']):\n"
            "    try:\n"
            "        cli(args)\n"
            "    except SystemExit as exit:\n"
            "        assert exit.code == 0, (args, exit.code)\n"
            "assert 'pyspark' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# --- nightly rescoring ----------------------------------------------------------------------------------


def catalog_with(changed=(), removed=()) -> pl.DataFrame:
    df = pl.read_csv(CATALOG)
    return df.with_columns(synopsis=pl.when(pl.col("anime_id").is_in(list(changed)))
                           .then(pl.col("synopsis") + " Then a new season begins.")
                           .otherwise(pl.col("synopsis"))).filter(~pl.col("anime_id").is_in(list(removed)))


def stored(store: Path) -> pl.DataFrame:
    return pl.read_parquet(str(current_snapshot(store) / "scores" / "*.parquet"))


def test_rescoring_scores_only_changed_rows_drops_removed_keys_and_hashes_as_duckdb(spark, tmp_path,
                                                                                     baseline_bundle):
    store, catalog = tmp_path / "store", tmp_path / "catalog.parquet"
    catalog_with().write_parquet(catalog)
    models = [str(baseline_bundle)]
    first = rescore_spark(spark, str(catalog), store, models=models)
    assert (first.rows_seen, first.models[0]["rows_scored"]) == (400, 400)

    again = rescore_spark(spark, str(catalog), store, models=models)
    assert (again.models[0]["rows_scored"], again.models[0]["rows_reused"]) == (0, 400)
    assert again.models[0]["prev_run_id"] == first.run_id and abs(again.models[0]["shift_mean"]) < 1e-9
    assert again.catalog_fingerprint == first.catalog_fingerprint

    changed, removed = (11, 22, 33, 44), (55, 66)  # 1% of the rows edited, two keys gone
    catalog_with(changed, removed).write_parquet(catalog)
    dry = rescore_spark(spark, str(catalog), store, models=models, dry_run=True)
    assert (dry.status, dry.models[0]["rows_scored"], dry.models[0]["rows_removed"]) == ("dry-run", 4, 2)
    assert (store / "CURRENT").read_text().strip() == again.run_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.parquet", "store", "store.lock"]
    assert sorted(p.name for p in (store / SNAPSHOTS).iterdir()) == sorted([first.run_id, again.run_id])
    third = rescore_spark(spark, str(catalog), store, models=models)
    counts = third.models[0]
    assert (counts["rows_scored"], counts["rows_reused"], counts["rows_removed"]) == (4, 394, 2)
    scores = stored(store)
    assert scores.height == 398 and scores["key"].n_unique() == 398
    assert sorted(scores.filter(pl.col("run_id") == third.run_id)["key"].cast(int)) == list(changed)
    assert not scores["key"].is_in([str(k) for k in removed]).any()
    runs = pl.read_parquet(current_snapshot(store) / "runs.parquet")
    assert runs["run_id"].to_list() == [first.run_id, again.run_id, third.run_id]
    assert len(list((store / SNAPSHOTS).iterdir())) == 2  # the published snapshot and the one before

    # a DuckDB store built from the same catalog: the same hashes, scores and fingerprint
    duck = rescore(catalog, tmp_path / "scores.duckdb", models=models)
    assert duck.catalog_fingerprint == third.catalog_fingerprint
    con = duckdb.connect(str(tmp_path / "scores.duckdb"), read_only=True)
    expected = con.sql("SELECT key, input_hash, score, imputed FROM rescore_scores").pl()
    joined = scores.join(expected, on="key", suffix="_duckdb")
    assert joined.height == expected.height == 398
    assert (joined["input_hash"] == joined["input_hash_duckdb"]).all()
    assert (joined["imputed"] == joined["imputed_duckdb"]).all()
    np.testing.assert_allclose(joined["score"].to_numpy(), joined["score_duckdb"].to_numpy(), rtol=0, atol=1e-6)


def test_a_run_killed_before_publishing_leaves_the_previous_snapshot_and_the_next_run_completes(
        spark, tmp_path, baseline_bundle):
    store, catalog = tmp_path / "store", tmp_path / "catalog.parquet"
    catalog_with().write_parquet(catalog)
    published = rescore_spark(spark, str(catalog), store, models=[str(baseline_bundle)])
    before = stored(store).sort("key")

    catalog_with(changed=(5, 6, 7)).write_parquet(catalog)
    err = tmp_path / "stderr"
    with open(err, "w") as fh:
        killed = subprocess.Popen(
            [sys.executable, "-c", "from anime_udf.cli import cli; cli()", "rescore", "--engine", "spark",
             "--master", "local[1]", "--catalog", str(catalog), "--store", str(store), "--model", str(baseline_bundle)],
            stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True,  # its JVM and workers: one process group
            env={**os.environ, "ANIME_UDF_RESCORE_PAUSE_AT": "commit"})
    try:
        deadline = time.monotonic() + 600
        while "paused at commit" not in err.read_text():
            assert killed.poll() is None, err.read_text()[-2000:]
            assert time.monotonic() < deadline, "the run never reached its switch"
            time.sleep(0.5)
        assert len(list((store / SNAPSHOTS).iterdir())) == 2  # the new snapshot is written ...
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    assert (store / "CURRENT").read_text().strip() == published.run_id  # ... but not published
    assert stored(store).sort("key").equals(before)

    done = rescore_spark(spark, str(catalog), store, models=[str(baseline_bundle)])
    assert done.models[0]["rows_scored"] == 3
    assert sorted(p.name for p in (store / SNAPSHOTS).iterdir()) == sorted([published.run_id, done.run_id])


def test_a_store_hashed_by_version_2_is_carried_over_as_on_duckdb(spark, tmp_path, baseline_bundle):
    """A snapshot of schema version 2 (v1 hashes) keeps every unchanged row's score, bit for bit:
    the next run scores only the edited rows and stores the hashes DuckDB stores."""
    from anime_udf.rescore.sql import sql_sections

    store, catalog = tmp_path / "store", tmp_path / "catalog.parquet"
    catalog_with().write_parquet(catalog)
    rescore_spark(spark, str(catalog), store, models=[str(baseline_bundle)])
    snapshot = current_snapshot(store)
    con = duckdb.connect()
    con.execute(sql_sections()["macros"])
    con.register("c", read_catalog(catalog))
    con.execute("CREATE TABLE v1 AS SELECT s.* REPLACE (rescore_input_hash_v1(c.synopsis, c.genres, c.studio, "
                f"c.episodes) AS input_hash) FROM read_parquet('{snapshot}/scores/*.parquet') s "
                "JOIN c ON s.key = CAST(c.anime_id AS VARCHAR)")
    shutil.rmtree(snapshot / "scores")
    (snapshot / "scores").mkdir()
    con.execute(f"COPY v1 TO '{snapshot / 'scores' / 'part-v1.parquet'}' (FORMAT parquet)")
    before = dict(con.execute("SELECT key, score FROM v1").fetchall())
    meta = json.loads((snapshot / "meta.json").read_text())
    (snapshot / "meta.json").write_text(json.dumps({**meta, "schema_version": "2"}))

    changed = (11, 22, 33)
    catalog_with(changed).write_parquet(catalog)
    run = rescore_spark(spark, str(catalog), store, models=[str(baseline_bundle)])
    assert (run.models[0]["rows_scored"], run.models[0]["rows_reused"]) == (3, 397)
    after = stored(store)
    kept = after.filter(pl.col("run_id") != run.run_id)
    assert kept.height == 397 and all(before[k] == v for k, v in zip(kept["key"], kept["score"]))
    rescore(catalog, tmp_path / "scores.duckdb", models=[str(baseline_bundle)])
    expected = duckdb.connect(str(tmp_path / "scores.duckdb"), read_only=True).sql(
        "SELECT key, input_hash FROM rescore_scores").pl()
    assert after.select("key", "input_hash").sort("key").equals(expected.sort("key"))


def as_first_release(spark, store: Path) -> None:
    """The published snapshot as the first release wrote it: without the columns added since
    (anime_udf.rescore.sql.ADDED_COLUMNS), schema version 1. Spark rewrites the scores, in its types."""
    from anime_udf.rescore.sql import ADDED_COLUMNS

    snapshot = current_snapshot(store)
    scores = spark.read.parquet(str(snapshot / "scores"))
    assert scores.where(" OR ".join(f"{c} IS NOT NULL" for c in ADDED_COLUMNS["rescore_scores"])).count() == 0
    scores.drop(*ADDED_COLUMNS["rescore_scores"]).write.parquet(str(snapshot / "scores-v1"))
    shutil.rmtree(snapshot / "scores")
    (snapshot / "scores-v1").rename(snapshot / "scores")
    runs = pq.read_table(snapshot / "runs.parquet")  # written by DuckDB
    assert all(runs[c].null_count == runs.num_rows for c in ADDED_COLUMNS["rescore_runs"])
    pq.write_table(runs.drop_columns(ADDED_COLUMNS["rescore_runs"]), snapshot / "runs.parquet")
    meta = json.loads((snapshot / "meta.json").read_text())
    (snapshot / "meta.json").write_text(json.dumps({**meta, "schema_version": "1"}))


def test_intervals_in_a_spark_store_as_in_a_duckdb_store_and_a_first_release_store_upgraded(
        spark, tmp_path, baseline_bundle):
    store, catalog = tmp_path / "store", tmp_path / "catalog.parquet"
    catalog_with().write_parquet(catalog)
    models = [str(baseline_bundle)]
    first = rescore_spark(spark, str(catalog), store, models=models)
    as_first_release(spark, store)
    before = stored(store).sort("key")

    upgraded = rescore_spark(spark, str(catalog), store, models=models)  # no row needs rescoring
    assert upgraded.models[0]["rows_scored"] == 0 and upgraded.models[0]["prev_run_id"] == first.run_id
    after = stored(store).sort("key")
    assert after.drop("level", "lo", "hi", "scored_at").equals(before.drop("scored_at"))
    assert (after["scored_at"].dt.epoch("us") == before["scored_at"].dt.epoch("us")).all()  # as UTC instants
    assert json.loads((current_snapshot(store) / "meta.json").read_text())["schema_version"] == "3"

    with_level = rescore_spark(spark, str(catalog), store, models=models, level=0.9)
    assert (with_level.level, with_level.models[0]["rows_scored"]) == (0.9, 400)
    assert rescore_spark(spark, str(catalog), store, models=models, level=0.9).models[0]["rows_scored"] == 0
    scores = stored(store)
    duck = rescore(catalog, tmp_path / "scores.duckdb", models=models, level=0.9)
    assert duck.models[0]["width_mean"] == pytest.approx(with_level.models[0]["width_mean"], abs=1e-5)
    con = duckdb.connect(str(tmp_path / "scores.duckdb"), read_only=True)
    expected = con.sql("SELECT key, level, score, lo, hi FROM rescore_scores").pl()
    con.close()
    joined = scores.join(expected, on="key", suffix="_duckdb")
    assert joined.height == 400 and (joined["level"] == joined["level_duckdb"]).all()
    for column in ("score", "lo", "hi"):
        np.testing.assert_allclose(joined[column].to_numpy(), joined[f"{column}_duckdb"].to_numpy(), rtol=0,
                                   atol=1e-5)


@pytest.mark.parametrize("broadcast_rows", [spark_rescoring.BROADCAST_TODO_ROWS, 0], ids=["broadcast", "sort-merge"])
def test_both_engines_keep_the_same_store_through_a_sequence_of_catalogs(spark, tmp_path, baseline_bundle,
                                                                         monkeypatch, broadcast_rows):
    """One catalog sequence (first run; rows changed, new and gone, with a level; a NULL key; a
    repeated key) on both engines: the same rows in the stores after each run, the same refusals;
    the rows to score joined to their inputs either way (a large catalog's are not broadcast)."""
    monkeypatch.setattr(spark_rescoring, "BROADCAST_TODO_ROWS", broadcast_rows)
    catalog, duck, sparks = tmp_path / "catalog.parquet", tmp_path / "scores.duckdb", tmp_path / "store"
    models = [str(baseline_bundle)]
    changed = catalog_with(changed=(11, 22), removed=(33, 44))
    added = pl.concat([changed, changed.head(2).with_columns(anime_id=pl.Series([90001, 90002]))])
    columns = ["key", "model_id", "input_hash", "imputed", "level"]
    for df, level in [(catalog_with(), None), (added, 0.9)]:
        df.write_parquet(catalog)
        on_spark = rescore_spark(spark, str(catalog), sparks, models=models, level=level)
        on_duckdb = rescore(catalog, duck, models=models, level=level)
        counts = ("rows_scored", "rows_reused", "rows_removed", "rows_superseded")
        assert [on_spark.models[0][c] for c in counts] == [on_duckdb.models[0][c] for c in counts]
        assert (on_spark.rows_imputed, on_spark.catalog_fingerprint) == (on_duckdb.rows_imputed,
                                                                         on_duckdb.catalog_fingerprint)
        with duckdb.connect(str(duck), read_only=True) as con:
            expected = con.sql("SELECT * FROM rescore_scores ORDER BY key").pl()
        got = stored(sparks).sort("key")
        assert got.select(columns).equals(expected.select(columns))
        for c in ("score", "lo", "hi"):  # recomputed on other workers and batches: the fp32 contract
            np.testing.assert_allclose(got[c].to_numpy().astype(float), expected[c].to_numpy().astype(float),
                                       rtol=0, atol=1e-5)
    for bad, message in [(added.with_columns(anime_id=pl.when(pl.col("anime_id") == 5).then(None)
                                             .otherwise(pl.col("anime_id"))), "is NULL in 1 row"),
                         (pl.concat([added, added.head(1)]), "is not unique: 1 occurs 2 times")]:
        bad.write_parquet(catalog)
        before_spark = stored(sparks)
        with duckdb.connect(str(duck), read_only=True) as con:
            rows_before = con.execute("SELECT count(*) FROM rescore_scores").fetchone()
        for run in (lambda: rescore_spark(spark, str(catalog), sparks, models=models),
                    lambda: rescore(catalog, duck, models=models)):
            with pytest.raises(RescoreError, match=message):
                run()
        assert stored(sparks).equals(before_spark)
        with duckdb.connect(str(duck), read_only=True) as con:
            assert con.execute("SELECT count(*) FROM rescore_scores").fetchone() == rows_before


def test_rescoring_refuses_bad_input_before_writing(spark, tmp_path, baseline_bundle):
    catalog = tmp_path / "catalog.parquet"
    pl.concat([catalog_with(), catalog_with().head(1)]).write_parquet(catalog)
    runner = CliRunner()
    args = ["rescore", "--engine", "spark", "--catalog", str(catalog), "--store", "store", "--model",
            str(baseline_bundle)]
    duplicate = runner.invoke(cli, args + ["--json"])
    assert duplicate.exit_code == 1
    assert json.loads(duplicate.stdout)["error"] == \
        "the catalog key anime_id is not unique: 1 occurs 2 times"
    assert not (tmp_path / "store" / "CURRENT").exists()
    assert not list((tmp_path / "store" / SNAPSHOTS).iterdir())
    no_key = runner.invoke(cli, args + ["--key", "id"])
    assert no_key.exit_code == 1 and "missing column(s) id" in no_key.output and "pass --key COLUMN" in no_key.output
    export = runner.invoke(cli, args + ["--export", "x.parquet"])
    assert export.exit_code == 2 and "a Spark store is Parquet already" in export.output


def fake_store(tmp_path, *complete: str, incomplete: tuple[str, ...] = ()) -> Path:
    """A store's snapshot directories (no Spark needed: CURRENT is checked before any work)."""
    store = tmp_path / "store"
    for name in (*complete, *incomplete):
        (store / SNAPSHOTS / name / "scores").mkdir(parents=True)
    for name in complete:
        (store / SNAPSHOTS / name / "runs.parquet").write_bytes(b"PAR1")
    return store


OLD, NEW = "20261101T000000Z-aaaaaa", "20261102T000000Z-bbbbbb"


@pytest.mark.parametrize("content", [b"../../elsewhere\n", b"/\n", b"\xff\xfe\x00junk", b"", b"..\n", b"gone\n",
                                     b"linked\n"])
def test_current_must_name_a_snapshot_in_the_store(tmp_path, content):
    store = fake_store(tmp_path, OLD, NEW)
    (tmp_path / "elsewhere").mkdir()
    (store / SNAPSHOTS / "linked").symlink_to(tmp_path / "elsewhere")
    (store / "CURRENT").write_bytes(content)
    with pytest.raises(RescoreError, match=rf"CURRENT does not name a snapshot directory in .*snapshots \(it holds "
                                           rf".*echo {NEW} > .*CURRENT"):
        current_snapshot(store)
    (store / "CURRENT").write_text(OLD + "\n")
    assert current_snapshot(store) == store / SNAPSHOTS / OLD


def test_a_store_without_current_is_new_only_if_no_run_completed(tmp_path):
    store = fake_store(tmp_path, incomplete=(OLD,))  # a first run killed before its records
    assert current_snapshot(store) is None
    (store / SNAPSHOTS / OLD / "runs.parquet").write_bytes(b"PAR1")
    with pytest.raises(RescoreError, match=rf"CURRENT is missing, but .* holds complete snapshots; .*echo {OLD} >"):
        current_snapshot(store)


@pytest.mark.parametrize("current", [None, b"../../elsewhere\n"])
def test_a_run_on_a_store_with_a_bad_current_prunes_nothing(tmp_path, baseline_bundle, current):
    store = fake_store(tmp_path, OLD, NEW)
    (tmp_path / "elsewhere" / "scores").mkdir(parents=True)
    if current is not None:
        (store / "CURRENT").write_bytes(current)
    with pytest.raises(RescoreError, match="CURRENT"):
        rescore_spark(None, str(tmp_path / "catalog.parquet"), store, models=[str(baseline_bundle)])
    assert sorted(p.name for p in (store / SNAPSHOTS).iterdir()) == [OLD, NEW]
    assert (tmp_path / "elsewhere" / "scores").is_dir()
