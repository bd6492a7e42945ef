"""Nightly rescoring on Spark: the DuckDB rescoring's semantics over a Parquet store.

``rescore_spark(spark, catalog, store)`` does what ``rescore`` (anime_udf/rescore/on_duckdb.py) does
(only new and changed rows are scored, keys gone from the catalog drop out, a run
record with counts and drift is appended) for catalogs that need a cluster. The row
work runs on Spark; the definitions are those of ``sql/rescore.sql``:

- the input hash is computed on the workers by DuckDB with that file's ``macros`` and
  ``input`` sections, over the inputs as ``read_catalog`` makes them: a row hashes the same
  on both engines (and, for a snapshot of an earlier version, its v1 hash beside it);
- the catalog fingerprint is that file's order-independent aggregate, summed on the
  executors: the driver receives one row;
- every decision is that file's, as the DuckDB store makes it: the ``checks``, ``plan``,
  ``counts``, ``apply`` and ``record`` sections, run by DuckDB on the driver over a copy of
  the published snapshot and the keys and input hashes Spark wrote (no synopsis reaches the
  driver); Spark scores the planned rows.

A run's phases: *plan* (hash the catalog on the executors; on the driver, copy the published
snapshot into DuckDB, check the catalog, list the rows to score, count), *score* (the listed
rows, on Spark), *record* (the ``apply`` and ``record`` sections on the driver's copy, written
as a new snapshot), *publish*.

The store is a directory::

    STORE/CURRENT                         the published snapshot's name (replaced atomically)
    STORE/snapshots/<run id>/scores/      Parquet: one row per (key, model id), the columns of
                                          rescore_scores (key, model_id, model_kind, input_hash,
                                          score, imputed, run_id, scored_at, level, lo, hi)
    STORE/snapshots/<run id>/runs.parquet every run record so far (the columns of rescore_runs)
    STORE/snapshots/<run id>/meta.json    schema version and key column (a snapshot of an earlier
                                          version lacks the columns added since: read as NULL)
    STORE.lock                            the run lock (an flock, as for a DuckDB store)

A run writes a new snapshot beside the published one and then publishes it by
replacing ``CURRENT`` (a rename): a run killed at any point leaves the previous
snapshot published, complete and readable, and the next run does the work. Readers
open ``current_snapshot(store)``; the snapshot before it is kept, so a reader who
resolved ``CURRENT`` just before a switch can finish. The test hook of
anime_udf/rescore/run.py applies: ``ANIME_UDF_RESCORE_PAUSE_AT=commit`` pauses a run after
its snapshot is written, before it is published.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Sequence
from contextlib import nullcontext
from functools import reduce
from pathlib import Path
from typing import Any, Iterator, Tuple

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from anime_udf.catalog import read_catalog
from anime_udf.columns import DEFAULT_KEY, INPUT_COLUMNS, SYNOPSIS
from anime_udf.files import atomic_file
from anime_udf.rescore.bundles import ModelChoice, resolve_models
from anime_udf.rescore.record import RunRecord, dry_run_record, run_record
from anime_udf.rescore.run import RescoreError, Run, pause
from anime_udf.rescore.sql import (NO_PROGRESS_BAR, SCHEMA_VERSION, check_schema_version, guard_words, refuse_shrink,
                                   run_records, run_section, sql_sections, start)
from anime_udf.rescore.store import store_lock
from anime_udf.spark import (CANONICAL_TYPES, SPARK_ERRORS, batch_label, job_error, read_parquet,
                             score_with_interval_udf, scoring_udf, ship_bundle, spark_struct)
from anime_udf.sqlutil import quote_literal
from anime_udf.udf import FUNCTION_NAMES

CURRENT = "CURRENT"
SNAPSHOTS = "snapshots"
META_FILE = "meta.json"
RUNS_FILE = "runs.parquet"
# The hashed catalog, one struct a row: sql/rescore.sql's rescore_input (the key as text, the
# canonical inputs, their hash, whether one was imputed, their v1 hash where the store holds
# v1 hashes) and the row's share of the catalog fingerprint (rescore_row_digest).
INPUT_FIELDS = {"key": pa.string(), **CANONICAL_TYPES, "input_hash": pa.string(), "imputed": pa.bool_(),
                "v1_hash": pa.string(), "row_digest": pa.int64()}
INPUT_STRUCT = spark_struct(INPUT_FIELDS)
# What Spark returns of the rows it scores: sql/rescore.sql's rescore_new.
SCORED_COLUMNS = ("model_id", "key", "score", "lo", "hi")
# Rows a scoring task takes at most (more tasks than cores where the work is large).
TASK_ROWS = 50_000
# The rows to score are joined to the catalog's inputs by key. Their Parquet file is small on disk
# (about 6 MB for 2,000,000 rows), so Spark would broadcast it, building a hash table of every row in
# the driver: at a million catalog rows that fails in local mode's default 1 GB heap. Broadcast up
# to this many rows (a few MB); a sort-merge join above.
BROADCAST_TODO_ROWS = 100_000
# What a failed run says: the published snapshot is the previous run's.
NOT_PUBLISHED = "rescore failed, nothing was published"
# A snapshot's name in CURRENT: a run id (20261129T210000Z-a1b2c3), never a path.
SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def current_snapshot(store: Path | str) -> Path | None:
    """The published snapshot of a Spark store, or None before its first run (no ``CURRENT``
    and no complete snapshot). ``CURRENT`` must hold the plain name of a snapshot directory in
    ``snapshots/``; anything else, or a missing ``CURRENT`` beside complete snapshots, is a
    RescoreError that says how to recover: a pointer is never followed out of the store."""
    store = Path(store)
    pointer, snapshots = store / CURRENT, store / SNAPSHOTS
    if not pointer.exists() and not pointer.is_symlink():
        if _complete_snapshots(store):
            raise RescoreError(f"{pointer} is missing, but {snapshots} holds complete snapshots; "
                               f"{_recovery(store)}")
        return None
    try:
        with open(pointer, "rb") as fh:
            held: bytes | str = fh.read(200)
    except OSError as exc:  # a directory, say
        held = f"unreadable: {exc.strerror or exc}"
    name = held.decode("ascii", errors="replace").strip() if isinstance(held, bytes) else ""
    snapshot = snapshots / name
    if not SNAPSHOT_NAME.fullmatch(name) or snapshot.is_symlink() or not snapshot.is_dir():
        raise RescoreError(f"{pointer} does not name a snapshot directory in {snapshots} (it holds {held!r:.60}); "
                           f"{_recovery(store)}")
    return snapshot


def _complete_snapshots(store: Path) -> list[str]:
    """Names of the snapshots whose run got as far as its run records (a run killed earlier left
    an incomplete one, never published), oldest first: run ids sort by time."""
    return sorted(p.parent.name for p in (store / SNAPSHOTS).glob(f"*/{RUNS_FILE}") if not p.parent.is_symlink())


def _recovery(store: Path) -> str:
    complete = _complete_snapshots(store)
    if not complete:
        return f"remove {store / CURRENT} if this store was never published, or restore the store from a backup"
    return (f"publish a snapshot by writing its name into {store / CURRENT} (the newest complete one: "
            f"echo {complete[-1]} > {store / CURRENT}), or move {store} away to start a new store")


# --- on the workers ------------------------------------------------------------------------------


def hashed_inputs(batches: Iterator[Tuple[pa.Array, ...]], label: str, schema_version: str | None
                  ) -> Iterator[pa.Array]:
    """(key, synopsis, genres, studio, episodes) batches -> INPUT_STRUCT, by read_catalog and
    sql/rescore.sql's ``input`` section, as the DuckDB rescoring computes them (with v1 hashes
    where the store's ``schema_version`` holds them)."""
    con = duckdb.connect()
    con.execute(NO_PROGRESS_BAR)
    con.execute(sql_sections()["macros"])
    con.execute("SET VARIABLE rescore_v1_hashes = rescore_v1_hashed(?)", [schema_version])
    for batch in batches:
        rows = read_catalog(pa.Table.from_arrays(list(batch), names=["key", *INPUT_COLUMNS]), name=label)
        con.register("rescore_batch", rows)
        con.execute("CREATE OR REPLACE TEMP VIEW rescore_catalog AS SELECT * FROM rescore_batch")
        con.execute(sql_sections()["input"])
        out = con.sql("SELECT *, rescore_row_digest(key, input_hash) AS row_digest FROM rescore_input").to_arrow_table()
        con.unregister("rescore_batch")
        yield pa.StructArray.from_arrays([out[n].combine_chunks().cast(t) for n, t in INPUT_FIELDS.items()],
                                         names=list(INPUT_FIELDS))
    con.close()


# --- a run ---------------------------------------------------------------------------------------


def rescore_spark(
    spark: SparkSession,
    catalog: str,
    store: Path | str,
    *,
    models: str | Sequence[str] = ("all",),
    models_dir: Path | str | None = None,
    key: str = DEFAULT_KEY,
    level: float | None = None,
    dry_run: bool = False,
    wait: float = 0.0,
    allow_shrink: bool = False,
    device: str = "auto",
    precision: str = "auto",
    ship: bool = False,
) -> RunRecord:
    """Rescore the Parquet ``catalog`` (a file, directory or glob) into the Spark store
    ``store`` (a directory). The options are those of ``rescore`` (on_duckdb.py);
    ``device`` and ``precision`` are the workers' text encoder's; ``ship`` sends the bundles
    to the executors (``anime_udf.spark.register``'s). Raises RescoreError (CatalogError for
    an unreadable catalog) with the published snapshot unchanged. Returns the run record."""
    store = Path(store).absolute()  # Spark resolves relative paths against its own start directory
    run = Run(store, catalog, key, level)
    refuse_bad_paths(catalog, store)
    choices = resolve_models(models, models_dir, level)
    if not dry_run:
        make_store_directory(store)
    work = (store.parent / f".{store.name}.dry-run-{run.id}") if dry_run else store / SNAPSHOTS / run.id
    con = duckdb.connect()
    con.execute(NO_PROGRESS_BAR)
    published = False
    try:
        with nullcontext() if dry_run else store_lock(store, wait, run.id):
            previous = current_snapshot(store)
            meta = read_meta(previous)
            inputs = hashed_catalog(spark, catalog, key, meta and meta["schema_version"]).persist()
            try:
                todo = plan(spark, con, run, choices, inputs, previous, meta, work, allow_shrink)
                if dry_run:
                    return dry_run_record(con, run)
                score(spark, con, run, choices, todo, work, device, precision, ship)
            finally:
                inputs.unpersist()
            records = record(con, work, run.id)
            publish(store, work, run.id, key)
            published = True
            prune(store, keep={run.id, previous.name if previous else run.id})
            return run_record(run, records)
    except (duckdb.Error, *SPARK_ERRORS) as exc:
        words = guard_words(exc) if isinstance(exc, duckdb.Error) else job_error(exc)
        raise RescoreError(f"{NOT_PUBLISHED}: {words}") from exc
    finally:
        con.close()
        if not published:
            shutil.rmtree(work, ignore_errors=True)


def refuse_bad_paths(catalog: str, store: Path) -> None:
    if store.exists() and not store.is_dir():
        raise RescoreError(f"{store}: is a file; a Spark store is a directory (a DuckDB store needs --engine duckdb)")
    if Path(catalog).resolve().is_relative_to(store.resolve()):
        raise RescoreError(f"--catalog {catalog} is inside --store {store}; keep the catalog outside the store")


def make_store_directory(store: Path) -> None:
    try:
        (store / SNAPSHOTS).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RescoreError(f"{store}: cannot create the store directory: {exc.strerror or exc}") from exc


def read_meta(snapshot: Path | None) -> dict[str, Any] | None:
    """The published snapshot's meta.json, of this schema or one it upgrades; None before the
    store's first run."""
    if snapshot is None:
        return None
    path = snapshot / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RescoreError(f"{path}: cannot read it ({exc}); the published snapshot is damaged") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("key_column"), str):
        raise RescoreError(f"{path}: names no key column; the published snapshot is damaged")
    try:
        check_schema_version(str(meta.get("schema_version")))  # a missing version is not this one either
    except RescoreError as exc:
        raise RescoreError(f"{snapshot}: {exc}") from None
    return meta


def hashed_catalog(spark: SparkSession, catalog: str, key: str, schema_version: str | None) -> DataFrame:
    """The catalog's keys and inputs with their hashes (INPUT_FIELDS), computed on the executors
    (``schema_version``: the published snapshot's; None before the store's first run)."""
    df = read_parquet(spark, catalog, key)
    label = batch_label(catalog)

    def hashed(batches: Iterator[Tuple[pa.Array, pa.Array, pa.Array, pa.Array, pa.Array]]) -> Iterator[pa.Array]:
        return hashed_inputs(batches, label, schema_version)

    row = F.arrow_udf(hashed, INPUT_STRUCT)(df[key], *(df[c] for c in INPUT_COLUMNS))
    return df.select(row.alias("row")).select("row.*")


def plan(spark: SparkSession, con: duckdb.DuckDBPyConnection, run: Run, choices: list[ModelChoice],
         inputs: DataFrame, previous: Path | None, meta: dict[str, Any] | None, work: Path,
         allow_shrink: bool) -> DataFrame:
    """The plan, by sql/rescore.sql's sections as the DuckDB rescoring makes it, run by DuckDB on
    the driver over the keys and input hashes Spark wrote (no synopsis reaches the driver): the
    hashed catalog checked (its keys, and the store's key column), the rows each model must score
    (the ``plan`` section; returned with their inputs, for Spark to score), the fingerprint, the
    counts. The driver's DuckDB is left as the file expects after its ``counts`` section."""
    inputs.select("key", "input_hash", "imputed", "v1_hash").write.parquet(str(work / "plan" / "input"))
    con.execute("ATTACH ':memory:' AS store")
    con.execute("USE store")
    run_section(con, "macros")
    run_section(con, "schema")  # the driver's copy of the store: a new store's empty tables, then filled
    if previous is not None:  # the published snapshot, of this version or an earlier one (BY NAME: NULL where
        register_parquet(con, "snapshot_scores", previous / "scores")  # it lacks a column)
        con.execute("INSERT INTO rescore_scores BY NAME SELECT * FROM snapshot_scores")
        con.register("previous_runs", pq.read_table(previous / RUNS_FILE))
        con.execute("INSERT INTO rescore_runs BY NAME SELECT * FROM previous_runs")
        con.execute("INSERT INTO rescore_meta VALUES ('schema_version', ?), ('key_column', ?)",
                    [meta["schema_version"], meta["key_column"]])
    start(con, run, choices)
    register_parquet(con, "rescore_input", work / "plan" / "input")
    try:
        run_section(con, "checks")
    except duckdb.Error as exc:  # the catalog's keys or the --key option: the guard's words say it
        raise RescoreError(guard_words(exc)) from None
    run_section(con, "plan")
    con.execute(f"COPY (SELECT model_id, key FROM rescore_todo) TO {quote_literal(work / 'plan' / 'todo.parquet')} "
                "(FORMAT parquet)")
    chosen = spark.createDataFrame([(c.model_id, c.kind) for c in choices], "model_id string, model_kind string")
    todo = spark.read.parquet(str(work / "plan" / "todo.parquet"))
    rows = con.execute("SELECT count(*) FROM rescore_todo").fetchone()[0]
    todo = (F.broadcast(todo) if rows <= BROADCAST_TODO_ROWS else todo.hint("merge"))
    todo = todo.join(inputs, "key").join(F.broadcast(chosen), "model_id")
    # The catalog fingerprint of sql/rescore.sql, its sum computed on the executors: the
    # driver receives one row, whatever the catalog's size.
    n, digest_sum = inputs.agg(F.count("*"), F.sum(F.col("row_digest").cast("decimal(38,0)"))).first()
    con.execute("SET VARIABLE rescore_catalog_fingerprint = rescore_fingerprint(?, ?::HUGEINT)",
                [n, str(digest_sum or 0)])
    if not allow_shrink:
        refuse_shrink(con, run)
    run_section(con, "counts")
    return todo


def score(spark: SparkSession, con: duckdb.DuckDBPyConnection, run: Run, choices: list[ModelChoice],
          todo: DataFrame, work: Path, device: str, precision: str, ship: bool) -> None:
    """The planned rows scored on Spark (SCORED_COLUMNS, as Parquet in ``work/new``), then into the
    driver's rescore_new, where sql/rescore.sql's ``apply`` section reads them."""
    to_score = dict(con.execute("SELECT model_id, rows_scored FROM rescore_counts").fetchall())
    scored = [scored_rows(spark, todo, c, to_score[c.model_id], run, device, precision, ship)
              for c in choices if to_score[c.model_id]]
    if not scored:
        return
    reduce(DataFrame.unionByName, scored).write.parquet(str(work / "new"))
    register_parquet(con, "scored_on_spark", work / "new")
    con.execute(f"INSERT INTO rescore_new SELECT {', '.join(SCORED_COLUMNS)} FROM scored_on_spark")


def scored_rows(spark: SparkSession, todo: DataFrame, choice: ModelChoice, rows: int, run: Run, device: str,
                precision: str, ship: bool) -> DataFrame:
    """The todo rows of one model, scored by the SQL function's UDF (with the run's level, and
    each score's interval, from one pass). Spread over the cluster's cores, shortest synopses
    first within a task (less padding)."""
    bundle = ship_bundle(spark, choice.path.resolve()) if ship else choice.path
    name = FUNCTION_NAMES[choice.kind]
    if run.level is None:
        scored = F.struct(scoring_udf(name, bundle, device, precision, ship)(*INPUT_COLUMNS).alias("score"),
                          F.lit(None).cast("double").alias("lo"), F.lit(None).cast("double").alias("hi"))
    else:
        scored = score_with_interval_udf(name, bundle, run.level, device, precision, ship)(*INPUT_COLUMNS)
    tasks = max(spark.sparkContext.defaultParallelism, math.ceil(rows / TASK_ROWS))
    mine = (todo.where(F.col("model_id") == choice.model_id).repartition(tasks)
            .sortWithinPartitions(F.length(F.coalesce(SYNOPSIS, F.lit("")))))
    return mine.select("model_id", "key", scored.alias("scored")).select("model_id", "key", "scored.*")


def record(con: duckdb.DuckDBPyConnection, work: Path, run_id: str) -> list[dict[str, Any]]:
    """sql/rescore.sql's ``apply`` and ``record`` sections on the driver's copy of the store (every
    row to score has a finite score, or nothing is written; gone keys and superseded rows out, the
    new rows in; the run record appended), then the new snapshot's files. Returns this run's records."""
    run_section(con, "apply")
    run_section(con, "record")
    (work / "scores").mkdir()
    con.execute(f"COPY rescore_scores TO {quote_literal(work / 'scores' / 'scores.parquet')} (FORMAT parquet)")
    con.execute(f"COPY rescore_runs TO {quote_literal(work / RUNS_FILE)} (FORMAT parquet)")
    return run_records(con, run_id)


def publish(store: Path, work: Path, run_id: str, key: str) -> None:
    """The snapshot complete (its meta beside it, the plan and Spark's scored rows gone), then
    published: ``CURRENT`` replaced by one rename."""
    shutil.rmtree(work / "plan")
    shutil.rmtree(work / "new", ignore_errors=True)  # none where nothing was scored
    with atomic_file(work / META_FILE) as tmp:
        tmp.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "key_column": key}))
    pause("commit")
    with atomic_file(store / CURRENT) as tmp:  # the switch
        tmp.write_text(run_id + "\n")


def register_parquet(con: duckdb.DuckDBPyConnection, name: str, directory: Path) -> None:
    """Expose the Parquet files Spark wrote in ``directory`` to DuckDB as ``name`` (an Arrow
    dataset of the files, listed by name: a path is never a glob pattern, and DuckDB reads
    only the columns a query needs)."""
    files = sorted(str(f) for f in directory.glob("*.parquet"))
    if not files:
        raise RescoreError(f"{directory}: no Parquet files; the store is damaged")
    con.execute(f"DROP VIEW IF EXISTS temp.main.{name}")  # registered before, or an earlier version's view
    con.register(name, pads.dataset(files, format="parquet"))


def prune(store: Path, keep: set[str]) -> None:
    """Remove snapshots other than ``keep``: older ones, and those of runs killed before publishing."""
    for path in (store / SNAPSHOTS).iterdir():
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
