"""A DuckDB database file as the catalog and the store: `sql --db`, `FILE.duckdb:TABLE` wherever a
catalog goes (score, eval, rescore, sql --table), and rescore's store inside the warehouse."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import duckdb
import polars as pl
import pytest
from click.testing import CliRunner

from anime_udf.catalog import CatalogError, DatabaseTable, catalog_source, read_catalog
from anime_udf.cli import cli
from anime_udf.rescore import RescoreError, rescore
from anime_udf.sqlutil import quote_literal
from tests.conftest import CATALOG
from tests.test_rescore import SCORE_COLUMNS, cli_subprocess, snapshot, wait_for

CHANGED = (1, 2, 3)
ADDED = (100001, 100002)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def warehouse(tmp_path) -> Path:
    """A warehouse file with the fixture catalog as table `anime` (DuckDB's own column types) and
    another table of its own."""
    path = tmp_path / "warehouse.duckdb"
    con = duckdb.connect(str(path))
    con.execute(f"CREATE TABLE anime AS SELECT * FROM read_csv({quote_literal(CATALOG)})")
    con.execute("CREATE TABLE studios AS SELECT DISTINCT studio FROM anime")
    con.close()
    return path


def query(database: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(database), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def edit(warehouse: Path) -> None:
    """3 synopses changed and 2 rows added, in the warehouse's own table."""
    con = duckdb.connect(str(warehouse))
    con.execute(f"UPDATE anime SET synopsis = synopsis || ' Then the sea rises.' WHERE anime_id IN {CHANGED}")
    con.execute("INSERT INTO anime SELECT anime_id + 100000, title, 'A show first aired tonight.', genres, studio, "
                f"episodes, score FROM anime WHERE anime_id IN {tuple(a - 100000 for a in ADDED)}")
    con.close()


def test_one_syntax_for_database_tables():
    assert catalog_source("w.duckdb:anime") == DatabaseTable(Path("w.duckdb"), "anime")
    assert catalog_source("dir/w.db:raw.anime") == DatabaseTable(Path("dir/w.db"), "raw.anime")
    assert catalog_source("a:b.csv") == Path("a:b.csv")  # a colon in a file name is a file name
    assert catalog_source("catalog.parquet") == Path("catalog.parquet")
    with pytest.raises(CatalogError, match="name the table after the colon"):
        catalog_source("w.duckdb:")


def test_sql_db_reads_and_writes_only_with_write(warehouse, tmp_path):
    out = tmp_path / "count.csv"
    result = run("sql", "--db", warehouse, "SELECT count(*) AS n, round(mae(score, 7), 6) AS m FROM anime",
                 "--out", out)
    assert result.exit_code == 0, result.output
    expected_mae = (pl.read_csv(CATALOG)["score"] - 7).abs().mean()
    assert pl.read_csv(out).row(0) == (400, round(expected_mae, 6))

    refused = run("sql", "--db", warehouse, "DELETE FROM anime")
    assert refused.exit_code == 1 and "read-only" in refused.output and "--write" in refused.output
    assert query(warehouse, "SELECT count(*) FROM anime") == [(400,)]

    written = run("sql", "--db", warehouse, "--write", "CREATE TABLE top AS SELECT * FROM anime WHERE score > 7")
    assert written.exit_code == 0, written.output
    assert query(warehouse, "SELECT count(*) FROM top")[0][0] == pl.read_csv(CATALOG).filter(pl.col("score") > 7).height
    # The macros are TEMP: loading them writes nothing into the database.
    assert query(warehouse, "SELECT count(*) FROM duckdb_functions() WHERE function_name = 'mae' "
                            "AND database_name = 'warehouse'") == [(0,)]

    # A --table of the --write database itself (read before the database is opened for writing).
    both = run("sql", "--db", warehouse, "--write", "--table", f"a={warehouse}:anime",
               "CREATE TABLE a_copy AS SELECT * FROM a")
    assert both.exit_code == 0, both.output
    assert query(warehouse, "SELECT count(*) FROM a_copy") == [(400,)]

    missing = run("sql", "--db", tmp_path / "none.duckdb", "SELECT 1")
    assert missing.exit_code == 2 and "no such database file (--write creates one)" in missing.output
    assert not (tmp_path / "none.duckdb").exists()


def test_score_eval_and_sql_read_a_table_as_they_read_the_file(warehouse, models, tmp_path):
    from_file, from_table = tmp_path / "file.parquet", tmp_path / "table.parquet"
    assert run("score", "--data", CATALOG, "--out", from_file).exit_code == 0
    result = run("score", "--data", f"{warehouse}:anime", "--out", from_table)
    assert result.exit_code == 0, result.output
    by_file, by_table = pl.read_parquet(from_file), pl.read_parquet(from_table)
    assert by_table["anime_id"].to_list() == by_file["anime_id"].to_list()
    assert (by_table["predict_score"] - by_file["predict_score"]).abs().max() <= 1e-6

    evaluated = [json.loads(run("eval", "--data", data, "--where", "anime_id % 2 = 0", "--json").output)
                 for data in (CATALOG, f"{warehouse}:anime")]
    assert evaluated[0][0]["n"] == evaluated[1][0]["n"] == 200
    assert evaluated[0][0]["mae"] == pytest.approx(evaluated[1][0]["mae"], abs=1e-6)

    parts = []
    for data, out in ((CATALOG, tmp_path / "parts-file.csv"), (f"{warehouse}:anime", tmp_path / "parts-table.csv")):
        result = run("explain", "--data", data, "--where", "anime_id < 20", "--out", out)
        assert result.exit_code == 0, result.output
        parts.append(pl.read_csv(out))
    assert parts[0].height == parts[1].height == 19
    assert (parts[0]["synopsis"] - parts[1]["synopsis"]).abs().max() <= 1e-6

    viewed = run("sql", "SELECT count(*) AS n FROM a", "--table", f"a={warehouse}:anime", "--out", tmp_path / "n.csv")
    assert viewed.exit_code == 0 and pl.read_csv(tmp_path / "n.csv")["n"][0] == 400


def test_missing_table_or_column_is_named(warehouse, models, tmp_path):
    no_table = run("score", "--data", f"{warehouse}:anmie", "--out", tmp_path / "s.parquet")
    assert no_table.exit_code == 1
    assert f"{warehouse}:anmie: the database has no table 'anmie' (its tables: anime, studios)" in no_table.output
    no_column = run("eval", "--data", f"{warehouse}:studios")
    assert no_column.exit_code == 1 and "missing column(s) synopsis, genres, episodes, score" in no_column.output
    with pytest.raises(CatalogError, match="a DuckDB database; name its table: .*warehouse.duckdb:TABLE"):
        read_catalog(warehouse)
    with pytest.raises(CatalogError, match="no such database file"):
        read_catalog(f"{tmp_path / 'none.duckdb'}:anime")
    assert not (tmp_path / "s.parquet").exists()


def test_rescore_from_a_table_matches_the_file(warehouse, models, tmp_path):
    rescore(CATALOG, tmp_path / "by_file.duckdb")
    report = rescore(f"{warehouse}:anime", tmp_path / "by_table.duckdb")
    assert report.catalog == f"{warehouse}:anime" and report.models[0]["rows_scored"] == 400
    columns = SCORE_COLUMNS.replace(", run_id, scored_at", "")
    by_file, by_table = (query(tmp_path / name, f"SELECT {columns} FROM rescore_scores ORDER BY key")
                         for name in ("by_file.duckdb", "by_table.duckdb"))
    assert [r[:4] + r[5:] for r in by_table] == [r[:4] + r[5:] for r in by_file]  # keys, hashes, flags
    assert max(abs(a[4] - b[4]) for a, b in zip(by_table, by_file)) <= 1e-6


def test_store_inside_the_warehouse(warehouse, models, tmp_path):
    """`--store` the catalog's own database: the rescore tables join the warehouse's, and a later
    run scores only what changed there."""
    args = ["rescore", "--catalog", f"{warehouse}:anime", "--store", warehouse, "--json"]
    first = run(*args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.output)["models"][0]["rows_scored"] == 400
    tables = {r[0] for r in query(warehouse, "SELECT table_name FROM duckdb_tables()")}
    assert tables == {"anime", "studios", "rescore_scores", "rescore_runs", "rescore_meta"}

    edit(warehouse)
    second = json.loads(run(*args).output)
    assert (second["models"][0]["rows_scored"], second["models"][0]["rows_reused"]) == (5, 397)
    assert query(warehouse, "SELECT count(*) FROM rescore_scores s JOIN anime a ON s.key = a.anime_id::VARCHAR "
                            f"WHERE s.run_id = '{second['run_id']}'") == [(5,)]

    # A database with tables of its own is a store only for a catalog of that database.
    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).execute("CREATE TABLE t AS SELECT 1 AS x").close()
    refused = run("rescore", "--catalog", CATALOG, "--store", other)
    assert refused.exit_code == 1 and "it is not a rescore store" in refused.output
    assert "--catalog FILE.duckdb:TABLE --store FILE.duckdb" in refused.output
    with pytest.raises(RescoreError, match="--catalog and --export are the same file"):
        rescore(f"{warehouse}:anime", tmp_path / "s.duckdb", export=warehouse)


def warehouse_state(warehouse: Path) -> dict:
    """The warehouse's own tables, and the store inside it."""
    return {"anime": query(warehouse, "SELECT * FROM anime ORDER BY anime_id"),
            "studios": query(warehouse, "SELECT * FROM studios ORDER BY studio"),
            **snapshot(warehouse)}


@pytest.mark.slow  # a process killed or holding the store
@pytest.mark.parametrize("phase", ["score", "commit"])
def test_kill_9_leaves_the_warehouse_and_its_store_consistent(warehouse, models, tmp_path, phase):
    rescore(f"{warehouse}:anime", warehouse)
    edit(warehouse)
    before = warehouse_state(warehouse)

    err = tmp_path / "stderr.txt"
    proc = cli_subprocess(["--catalog", f"{warehouse}:anime", "--store", str(warehouse)], err,
                          ANIME_UDF_RESCORE_PAUSE_AT=phase)
    wait_for(proc, err, f"paused at {phase}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    assert warehouse_state(warehouse) == before  # its tables, scores and run records as before the run
    report = rescore(f"{warehouse}:anime", warehouse)  # the next run completes the work
    assert report.models[0]["rows_scored"] == 5
    after = warehouse_state(warehouse)
    assert after["anime"] == before["anime"] and after["studios"] == before["studios"]
    assert len(after["runs"]) == 2 and len(after["scores"]) == 402


def test_train_reads_a_table_too(warehouse, tmp_path):
    result = run("train", "baseline", "--data", f"{warehouse}:studios", "--out", tmp_path / "b")
    assert result.exit_code == 1 and f"{warehouse}:studios: missing column(s) synopsis" in result.output


def test_read_only_db_holds_against_attach_and_detach(warehouse, tmp_path):
    other = tmp_path / "other.duckdb"
    bypass = (f"ATTACH {quote_literal(other)} AS m (READ_WRITE); USE m; DETACH warehouse; "
              f"ATTACH {quote_literal(warehouse)} AS r2 (READ_WRITE); DROP TABLE r2.studios")
    refused = run("sql", "--db", warehouse, bypass)
    assert refused.exit_code == 2, refused.output
    assert f"ATTACH {quote_literal(other)} AS m (READ_WRITE)" in refused.output and "--table" in refused.output
    assert query(warehouse, "SELECT count(*) FROM studios")[0][0] > 0 and not other.exists()
    detach = run("sql", "--db", warehouse, "USE temp.main; DETACH warehouse")
    assert detach.exit_code == 2 and "DETACH warehouse" in detach.output


@pytest.fixture
def small_table(warehouse) -> Path:
    con = duckdb.connect(str(warehouse))
    con.execute("CREATE TABLE t (a INTEGER, b VARCHAR); INSERT INTO t VALUES (1, 'kept')")
    con.close()
    return warehouse


@pytest.mark.parametrize("script", [
    "DELETE FROM t; INSERT INTO t VALUES ('notanint', 'x')",
    "DELETE FROM t; SELECT error('fails as the last statement is read')",
])
def test_a_write_script_is_all_or_nothing(small_table, script):
    failed = run("sql", "--db", small_table, "--write", script)
    assert failed.exit_code == 1, failed.output
    assert query(small_table, "SELECT * FROM t") == [(1, "kept")]


def test_a_write_script_with_its_own_transaction_is_refused(small_table):
    refused = run("sql", "--db", small_table, "--write", "BEGIN; DELETE FROM t; COMMIT")
    assert refused.exit_code == 2 and "BEGIN" in refused.output and "one transaction" in refused.output
    assert query(small_table, "SELECT * FROM t") == [(1, "kept")]
    done = run("sql", "--db", small_table, "--write", "DELETE FROM t; INSERT INTO t VALUES (2, 'new')")
    assert done.exit_code == 0, done.output
    assert query(small_table, "SELECT * FROM t") == [(2, "new")]


@pytest.mark.parametrize("write", [True, False])
def test_a_db_that_is_not_a_duckdb_file_is_named(tmp_path, write):
    data = tmp_path / "data.csv"
    data.write_text("a,b\n1,2\n")
    result = run("sql", "--db", data, *(["--write"] if write else []), "CREATE TABLE keep AS SELECT 1 AS x")
    assert result.exit_code == 2 and f"{data}: not a DuckDB database file" in result.output, result.output
    assert data.read_text() == "a,b\n1,2\n"


def test_warehouse_paths_relative_with_colons_and_dotted_table_names(tmp_path, baseline_bundle):
    """Relative paths (the tests run in tmp_path) whose first part has a colon, an existing file
    whose name looks like FILE.db:TABLE, and a table whose name has a dot."""
    Path("snap:1").mkdir()
    con = duckdb.connect(str(tmp_path / "snap:1" / "w.duckdb"))
    con.execute(f"CREATE TABLE anime AS SELECT * FROM read_csv({quote_literal(CATALOG)})")
    con.execute('CREATE TABLE "dot.ted" AS SELECT * FROM anime; CREATE SCHEMA raw; '
                "CREATE TABLE raw.anime AS SELECT * FROM anime")
    con.close()
    for table in ("snap:1/w.duckdb:anime", "./snap:1/w.duckdb:anime", "snap:1/w.duckdb:dot.ted",
                  "snap:1/w.duckdb:raw.anime"):
        assert read_catalog(table).height == 400, table
    result = run("sql", "--db", "./snap:1/w.duckdb", "SELECT count(*) AS n FROM anime", "--out", "n.csv")
    assert result.exit_code == 0, result.output
    assert pl.read_csv("n.csv")["n"][0] == 400
    # the nightly job on the same relative paths: its store beside the table, in that database
    record = rescore("./snap:1/w.duckdb:anime", Path("./snap:1/w.duckdb"), models=str(baseline_bundle))
    assert record.models[0]["rows_scored"] == 400

    Path("snap.db:1").mkdir()
    shutil.copy(CATALOG, "snap.db:1/catalog.csv")
    assert catalog_source("snap.db:1/catalog.csv") == Path("snap.db:1/catalog.csv")
    assert read_catalog("snap.db:1/catalog.csv").height == 400


def test_a_write_script_whose_out_cannot_be_written_saves_nothing(small_table, tmp_path):
    """--out is part of "all of it is saved, or nothing": the result is written before the commit."""
    (tmp_path / "afile").write_text("")
    script = "INSERT INTO t VALUES (2, 'new'); SELECT * FROM t"
    failed = run("sql", "--db", small_table, "--write", script, "--out", tmp_path / "afile" / "result.csv")
    assert failed.exit_code == 1 and failed.output.startswith(f"Error: {tmp_path / 'afile' / 'result.csv'}: cannot")
    assert query(small_table, "SELECT * FROM t") == [(1, "kept")]
    done = run("sql", "--db", small_table, "--write", script, "--out", tmp_path / "result.csv")
    assert done.exit_code == 0, done.output
    assert query(small_table, "SELECT count(*) FROM t") == [(2,)] and pl.read_csv(tmp_path / "result.csv").height == 2


@pytest.mark.parametrize(("write", "script"), [
    (False, "COPY t TO 'out.csv'"),
    (False, "COPY (SELECT * FROM t) TO 'x.parquet' (FORMAT parquet)"),
    (False, "EXPORT DATABASE 'dump'"),
    (False, "INSTALL json"),
    (True, "DELETE FROM t; COPY (SELECT 'to' AS x FROM t) TO 'out.csv'"),
    (True, "EXPORT DATABASE 'dump'"),
    (True, "ATTACH 'other.duckdb'"),
])
def test_sql_db_writes_no_file_but_out(small_table, tmp_path, write, script):
    """Read-only or not, a --db script changes at most the database: the statements that write
    elsewhere (files a failed --write script could not take back, a new database, a download)
    are refused before anything runs."""
    refused = run("sql", "--db", small_table, *(["--write"] if write else []), script)
    assert refused.exit_code == 2, refused.output
    assert "--out" in refused.output or "--table" in refused.output or "installs nothing" in refused.output
    assert query(small_table, "SELECT * FROM t") == [(1, "kept")]
    assert [name for name in ("out.csv", "x.parquet", "dump", "other.duckdb") if (tmp_path / name).exists()] == []


def test_a_write_script_may_fill_a_table_from_a_file(small_table, tmp_path):
    pl.DataFrame({"a": [5], "b": ["from a file"]}).write_csv(tmp_path / "rows.csv")
    done = run("sql", "--db", small_table, "--write", "COPY t FROM 'rows.csv' (HEADER)")
    assert done.exit_code == 0, done.output
    assert query(small_table, "SELECT * FROM t ORDER BY a") == [(1, "kept"), (5, "from a file")]


def test_every_table_name_the_error_lists_can_be_used(tmp_path, models):
    """Names with colons and dots, as listed by the missing-table error, and SQL's quoted form."""
    path = tmp_path / "q.duckdb"
    con = duckdb.connect(str(path))
    con.execute('CREATE SCHEMA "s.x"')
    for table in ('main."a:b"', '"s.x"."t.y"'):
        con.execute(f"CREATE TABLE {table} AS SELECT * FROM read_csv({quote_literal(CATALOG)}) LIMIT 3")
    con.close()
    missing = run("score", "--data", f"{path}:nope", "--out", tmp_path / "x.csv")
    assert "its tables: a:b, s.x.t.y" in missing.output, missing.output
    for name in ("a:b", "s.x.t.y", '"s.x"."t.y"', '"A:B"'):
        result = run("score", "--data", f"{path}:{name}", "--out", tmp_path / "scored.csv")
        assert result.exit_code == 0, (name, result.output)
        assert pl.read_csv(tmp_path / "scored.csv").height == 3
