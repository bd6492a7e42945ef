"""Prediction intervals in the nightly store (rescore --level): stored beside each score as the
SQL functions give them, recomputed only where needed, and a store of the first release
upgraded in place by its next run without a row rescored, a kill midway included."""

from __future__ import annotations

import os
import signal

import duckdb
import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

import anime_udf
from anime_udf.bundle import CALIBRATION_FILE
from anime_udf.cli import cli
from anime_udf.rescore import RescoreError, rescore
from anime_udf.rescore.sql import ADDED_COLUMNS, sql_sections
from tests.conftest import assert_fp32_close, older_bundle
from tests.test_rescore import catalog_a, catalog_b, cli_subprocess, run_sql_script, wait_for, write

STORED = "SELECT key, model_id, input_hash, score, run_id, scored_at, level, lo, hi FROM rescore_scores ORDER BY key"


def rows(store) -> list[tuple]:
    with duckdb.connect(str(store), read_only=True) as con:
        return con.execute(STORED).fetchall()


def layout(store) -> dict[str, list[tuple[str, str]]]:
    """The store tables' columns and the schema version its rescore_meta names."""
    with duckdb.connect(str(store), read_only=True) as con:
        columns = con.execute("SELECT table_name, column_name, data_type FROM duckdb_columns() "
                              "WHERE table_name LIKE 'rescore_%' ORDER BY table_name, column_index").fetchall()
        version = con.execute("SELECT value FROM rescore_meta WHERE name = 'schema_version'").fetchone()[0]
    found: dict = {"version": version}
    for table, column, data_type in columns:
        found.setdefault(table, []).append((column, data_type))
    return found


def first_release_layout() -> dict:
    """The store's tables as the first release created them: sql/rescore.sql's schema section
    without the ALTER statements that later versions added."""
    con = duckdb.connect()
    con.execute("\n".join(line for line in sql_sections()["schema"].splitlines() if not line.startswith("ALTER")))
    con.execute("INSERT INTO rescore_meta VALUES ('schema_version', '1')")
    found = {"version": "1"}
    for table, column, data_type in con.execute(
            "SELECT table_name, column_name, data_type FROM duckdb_columns() WHERE database_name = 'memory' "
            "ORDER BY table_name, column_index").fetchall():
        found.setdefault(table, []).append((column, data_type))
    con.close()
    return found


def as_first_release(store) -> None:
    """Turn a store written without a level into the store the first release writes: the same
    rows and runs, the columns added since dropped, schema version 1."""
    with duckdb.connect(str(store)) as con:
        assert con.execute("SELECT count(*) FROM rescore_scores WHERE level IS NOT NULL").fetchone()[0] == 0
        for table, columns in ADDED_COLUMNS.items():
            for column in columns:
                con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        con.execute("UPDATE rescore_meta SET value = '1' WHERE name = 'schema_version'")
    assert layout(store) == first_release_layout()


def test_a_run_with_a_level_stores_the_intervals_the_sql_functions_give(tmp_path, models, baseline_bundle):
    store, export = tmp_path / "scores.duckdb", tmp_path / "scores.parquet"
    a = write(catalog_a(), tmp_path / "a.csv")
    record = rescore(a, store, level=0.9, export=export)
    assert record.level == 0.9 and record.models[0]["rows_scored"] == 400
    stored = pl.read_parquet(export)
    assert stored.height == 400 and (stored["level"] == 0.9).all()
    assert ((stored["lo"] <= stored["score"]) & (stored["score"] <= stored["hi"])).all()
    assert record.models[0]["width_mean"] == pytest.approx((stored["hi"] - stored["lo"]).mean())

    con = duckdb.connect()
    anime_udf.register(con, baseline=baseline_bundle)
    con.register("catalog", catalog_a())
    expected = con.sql("SELECT anime_id, predict_score(synopsis, genres, studio, episodes) AS score, "
                       "predict_score_interval(synopsis, genres, studio, episodes, 0.9) AS i FROM catalog").pl()
    joined = stored.join(expected.unnest("i"), on="anime_id", suffix="_sql")
    for column in ("score", "lo", "hi"):  # recomputed in other batches: the fp32 contract
        assert_fp32_close(joined[column].to_numpy(), joined[f"{column}_sql"].to_numpy())


def test_intervals_are_recomputed_only_where_needed(tmp_path, models):
    store = tmp_path / "scores.duckdb"
    a, b = write(catalog_a(), tmp_path / "a.csv"), write(catalog_b(), tmp_path / "b.csv")
    rescore(a, store, level=0.9)
    at_09 = rows(store)
    assert rescore(a, store, level=0.9).models[0]["rows_scored"] == 0
    assert rescore(a, store).models[0]["rows_scored"] == 0  # no level: the stored intervals stay
    assert rows(store) == at_09

    record = rescore(b, store)  # 5 changed and 2 new rows, scored without a level: no interval
    assert record.models[0]["rows_scored"] == 7 and record.level is None
    after = {r[0]: r for r in rows(store)}
    scored = {k for k, r in after.items() if r[4] == record.run_id}
    assert all(after[k][6:] == (None, None, None) for k in scored)
    assert all(after[k][6] == 0.9 for k in after.keys() - scored)

    assert rescore(b, store, level=0.9).models[0]["rows_scored"] == 7  # the rows without one
    assert rescore(b, store, level=0.8).models[0]["rows_scored"] == 399  # every row: another level
    assert {r[6] for r in rows(store)} == {0.8}


def test_a_first_release_store_is_upgraded_in_place_without_rescoring(tmp_path, models):
    store, a = tmp_path / "scores.duckdb", write(catalog_a(), tmp_path / "a.csv")
    first = rescore(a, store)
    as_first_release(store)
    before = rows_of_first_release(store)

    dry = rescore(a, store, dry_run=True)  # planned on the old tables, which stay as they are
    assert dry.models[0]["rows_scored"] == 0 and layout(store) == first_release_layout()
    upgraded = rescore(a, store)
    assert upgraded.models[0]["rows_scored"] == 0 and upgraded.models[0]["prev_run_id"] == first.run_id
    assert layout(store) == layout_of_this_release(tmp_path)
    assert [r[:6] for r in rows(store)] == before  # every row kept bit for bit, as it was stored
    assert {r[6:] for r in rows(store)} == {(None, None, None)}
    assert rescore(a, store, level=0.9).models[0]["rows_scored"] == 400


def rows_of_first_release(store) -> list[tuple]:
    with duckdb.connect(str(store), read_only=True) as con:
        return con.execute(STORED.replace(", level, lo, hi", "")).fetchall()


def layout_of_this_release(tmp_path) -> dict:
    fresh = tmp_path / "fresh.duckdb"
    rescore(write(catalog_a().head(3), tmp_path / "three.csv"), fresh)
    return layout(fresh)


@pytest.mark.slow  # a process killed
def test_an_upgrade_killed_midway_leaves_the_first_release_store(tmp_path, models, baseline_bundle):
    store, a = tmp_path / "scores.duckdb", write(catalog_a(), tmp_path / "a.csv")
    rescore(a, store)
    as_first_release(store)
    before = rows_of_first_release(store)
    b = write(catalog_b(), tmp_path / "b.csv")
    err = tmp_path / "stderr.txt"
    proc = cli_subprocess(["--catalog", str(b), "--store", str(store), "--level", "0.9"], err,
                          ANIME_UDF_RESCORE_PAUSE_AT="commit")  # inside the transaction, the tables altered
    wait_for(proc, err, "paused at commit")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert layout(store) == first_release_layout() and rows_of_first_release(store) == before

    record = rescore(b, store, level=0.9)  # the next run upgrades and completes the work
    assert record.models[0]["rows_scored"] == 399
    assert {r[6] for r in rows(store)} == {0.9}


def test_a_level_needs_calibrated_bundles_and_a_level_in_range(tmp_path, models, baseline_bundle):
    store, a = tmp_path / "scores.duckdb", write(catalog_a(), tmp_path / "a.csv")
    old = older_bundle(baseline_bundle, tmp_path / "old-baseline", CALIBRATION_FILE, "calibration")
    with pytest.raises(RescoreError, match=r"old-baseline: this bundle has no calibration .* cannot store "
                                           r"intervals at --level 0.9; rescore without --level"):
        rescore(a, store, models=[str(old)], level=0.9)
    assert not store.exists()
    assert rescore(a, store, models=[str(old)]).models[0]["rows_scored"] == 400  # it scores without one
    for level in (0, 1, 1.5):
        result = CliRunner().invoke(cli, ["rescore", "--catalog", str(a), "--store", str(store), "--level",
                                          str(level), "--json"])
        assert result.exit_code == 2 and "--level" in result.stdout
        with pytest.raises(RescoreError, match=f"the level {level} is not between 0 and 1"):
            rescore(a, store, level=level)


def test_the_cli_summary_and_json_name_the_level(tmp_path, models):
    a, store = write(catalog_a(), tmp_path / "a.csv"), tmp_path / "scores.duckdb"
    args = ["rescore", "--catalog", str(a), "--store", str(store), "--level", "0.9"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "with each score's 90% interval" in result.output
    assert "90% intervals: mean width" in result.output
    record = CliRunner().invoke(cli, [*args, "--json"])
    assert record.exit_code == 0 and '"level": 0.9' in record.stdout


def test_the_sql_script_run_with_a_level_stores_what_the_cli_stores(tmp_path, models, baseline_bundle):
    a = write(catalog_a(), tmp_path / "a.csv")
    by_sql, by_cli = tmp_path / "sql.duckdb", tmp_path / "cli.duckdb"
    run_sql_script(by_sql, a, baseline_bundle, level=0.9)
    rescore(a, by_cli, level=0.9)
    sql_rows, cli_rows = rows(by_sql), rows(by_cli)
    assert [r[:3] + r[6:7] for r in sql_rows] == [r[:3] + r[6:7] for r in cli_rows]
    for column in (3, 7, 8):  # score, lo, hi: the same scorer in other batches
        assert_fp32_close([r[column] for r in sql_rows], [r[column] for r in cli_rows])
    assert rescore(a, by_sql, level=0.9).models[0]["rows_scored"] == 0  # each finds the other's up to date
    run_sql_script(by_cli, a, baseline_bundle, level=0.9)
    with duckdb.connect(str(by_cli), read_only=True) as con:
        assert con.execute("SELECT rows_scored, level FROM rescore_runs ORDER BY finished_at DESC").fetchone() == (0, 0.9)


def test_a_store_of_an_unknown_version_is_refused_naming_both(tmp_path, models):
    store, a = tmp_path / "scores.duckdb", write(catalog_a().head(20), tmp_path / "a.csv")
    rescore(a, store)
    with duckdb.connect(str(store)) as con:
        con.execute("UPDATE rescore_meta SET value = '4' WHERE name = 'schema_version'")
    with pytest.raises(RescoreError, match="the store has rescore schema version 4; this anime-udf writes "
                                           "version 3 and upgrades version 1, 2"):
        rescore(a, store)


def test_a_score_not_finite_or_outside_its_interval_applies_nothing(tmp_path, models, monkeypatch):
    """The apply section's guard (both engines run it): a row scored NaN, or outside its interval,
    fails the run with the store as it was."""
    from anime_udf.rescore import on_duckdb

    store, a = tmp_path / "scores.duckdb", write(catalog_a().head(20), tmp_path / "a.csv")
    rescore(a, store)
    before = rows(store)
    real = on_duckdb.scores_of
    for broken in ({"score": np.nan}, {"lo": 10.0}):
        def scores_of(scorer, inputs, level, broken=broken):
            scored = {k: np.array(v, dtype=float) for k, v in real(scorer, inputs, level).items()}
            for column, value in broken.items():
                scored[column][0] = value
            return scored

        monkeypatch.setattr(on_duckdb, "scores_of", scores_of)
        with pytest.raises(RescoreError, match=r"1 row\(s\) to score have no finite score, or no interval holding it; nothing was applied"):
            rescore(a, store, level=0.9)
        assert rows(store) == before
