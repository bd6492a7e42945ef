"""Rescoring into a DuckDB store: ``rescore(catalog, store)``.

The store (a DuckDB file: its own, or the catalog's warehouse) keeps one score per (catalog
key, model id) with the hash of the inputs it was computed from. The statements are
sql/rescore.sql's (anime_udf/rescore/sql.py); this module runs them in a run's phases:

1. *lock*: take ``STORE.lock`` (anime_udf/rescore/store.py);
2. *plan*: open the store read-only, hash the catalog's inputs, check the keys, list the
   rows each model must score, then close the store again, so that readers can open it
   while the slow scoring runs;
3. *score* those rows, streamed in chunks (so memory does not grow with the catalog),
   into a temporary table (the embedding cache keeps each encoded synopsis, so a killed
   run's work is not lost); the run's DuckDB spills to a temporary directory beyond
   ``WORK_MEMORY_LIMIT`` (one a killed run left behind is removed by the next run);
4. *apply*: open the store read-write and, in one transaction, delete keys gone from the
   catalog (their rows of every kind) and rows of superseded bundles, upsert the new
   scores, append the run record;
5. *publish*: COMMIT, then the export (optional: Parquet written to a hidden temporary
   file, fsynced, renamed).

A crash before COMMIT leaves the store as the previous run left it; after COMMIT, as this
run left it. The next run completes the work. A failure from COMMIT on (DuckDB can make a
COMMIT durable in its write-ahead log and then fail to checkpoint, e.g. on a full disk) is
noted in the lock file: the next run of the same work reuses that run's id, so the run is
recorded once whether or not the COMMIT took effect.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from anime_udf.catalog import DatabaseTable, catalog_label, catalog_source, read_catalog
from anime_udf.columns import DEFAULT_KEY, INPUT_COLUMNS
from anime_udf.devices import DEVICES, PRECISIONS, check_choice
from anime_udf.files import atomic_file, process_running
from anime_udf.rescore.bundles import ModelChoice, resolve_models
from anime_udf.rescore.record import RunRecord, dry_run_record, run_record
from anime_udf.rescore.run import RescoreError, Run, pause
from anime_udf.rescore.sql import catalog_fingerprint, guard_words, refuse_shrink, run_records, set_variable
from anime_udf.rescore.sql import run_section as _run  # the run's one way to run a section: a test makes COMMIT fail
from anime_udf.rescore.sql import NO_PROGRESS_BAR, sql_sections, start
from anime_udf.rescore.store import attach, detach, has_store_tables, in_store, lock_path, note_unfinished
from anime_udf.rescore.store import store_for_planning, store_lock, waiting_while_open_elsewhere
from anime_udf.sqlutil import quote_ident, quote_literal

if TYPE_CHECKING:
    from anime_udf.scoring import Rows, Scorer  # torch: imported only when there is work

T = TypeVar("T")
R = TypeVar("R")

# Rows scored at a time: large enough that the vectorised steps (lexical view, tabular
# features, cache look-ups, the heads) run at full speed, small enough to bound memory.
CHUNK_ROWS = 4096
# Chunks scored at once, in threads: while one chunk's model runs torch, polars or SQLite (which
# release the GIL), the other's Python runs; each model scores one chunk at a time (its lock).
SCORING_THREADS = 2
# What the run's own DuckDB (the catalog's hashes, the plan, the new scores) may hold in
# memory; beyond it, its temporary tables spill to a temporary directory.
WORK_MEMORY_LIMIT = "1GB"
# Once the rows are scored, opening the store to apply them waits at least this long
# for a reader to close it: failing there would throw the scoring away.
APPLY_WAIT_SECONDS = 60.0
# A chunk of scores, as score() writes them to its work directory.
SCORED_SCHEMA = pa.schema([("model_id", pa.string()), ("key", pa.string()), ("score", pa.float64()),
                           ("lo", pa.float64()), ("hi", pa.float64())])


def rescore(
    catalog: Any,
    store: Path | str,
    *,
    models: str | Sequence[str] = ("all",),
    models_dir: Path | str | None = None,
    key: str = DEFAULT_KEY,
    level: float | None = None,
    export: Path | str | None = None,
    dry_run: bool = False,
    wait: float = 0.0,
    progress: bool | None = None,
    chunk_rows: int = CHUNK_ROWS,
    allow_shrink: bool = False,
    device: str = "auto",
    precision: str = "auto",
) -> RunRecord:
    """Rescore ``catalog`` (a path, ``FILE.duckdb:TABLE`` or anything ``read_catalog`` takes)
    into ``store``, a DuckDB file: its own, or the catalog's database (its rescore_* tables
    then sit beside the warehouse's, changed by the same one transaction a run).

    ``models``: ``all``, ``baseline``, ``fusion`` or bundle names/paths, in ``models_dir``.
    ``level``: store each score's prediction interval at this level in (0, 1) beside it
    (rows stored without one, or at another level, are scored again); None: compute none.
    ``wait``: seconds to wait for a concurrent run (or another process holding the store)
    before failing; applying the scored rows waits at least ``APPLY_WAIT_SECONDS``.
    ``progress``: a progress bar on stderr (None: only on a terminal). ``allow_shrink``:
    apply a run that removes more than ``SHRINK_LIMIT`` of the stored keys (refused
    otherwise, dry runs included). ``device``, ``precision``: the text encoder's, as for
    ``anime_udf.register``. Raises RescoreError (StoreBusyError for a held
    store) with the store unchanged, except where its message says that the COMMIT
    failed or that something after it did. Returns the run record.
    """
    store = Path(store)
    if isinstance(catalog, (str, Path)):
        catalog = catalog_source(catalog)  # a file, or a table of a DuckDB database
    run = Run(store, catalog_label(catalog), key, level)
    export = Path(export) if export is not None else None
    refuse_bad_arguments(catalog, store, export, chunk_rows, device, precision)
    choices = resolve_models(models, models_dir, level)
    rows = read_catalog_rows(catalog, run, wait)
    if not dry_run:
        make_store_directory(store)
    with work_directory() as work_dir:
        con = duckdb.connect(config={"temp_directory": work_dir, "memory_limit": WORK_MEMORY_LIMIT})
        try:
            with nullcontext({}) if dry_run else store_lock(store, wait, run.id) as previous:
                plan(con, run, rows, choices, shared=in_store(catalog, store), wait=wait,
                     export=export is not None, allow_shrink=allow_shrink, dry_run=dry_run)
                del rows  # the plan holds what it needs (rescore_input): the catalog is not held twice
                if dry_run:
                    return dry_run_record(con, run)
                work = resume_unfinished(con, run, choices, previous)
                score(con, choices, level, progress, chunk_rows, device, precision, Path(work_dir))
                apply(con, store, wait)
                return publish(con, run, export, work)
        except duckdb.Error as exc:
            raise RescoreError(f"rescore failed, the store is unchanged: {guard_words(exc)}") from exc
        finally:
            con.close()


WORK_DIR_PREFIX = "anime-udf-rescore-"


def work_directory() -> tempfile.TemporaryDirectory:
    """The run's temporary directory, named by its process id; the directories of runs whose
    process is gone (killed: kill -9 skips every clean-up) are removed first, as their
    spilled rows can be as large as the catalog."""
    for path in Path(tempfile.gettempdir()).glob(f"{WORK_DIR_PREFIX}*-*"):
        pid = path.name[len(WORK_DIR_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not process_running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{WORK_DIR_PREFIX}{os.getpid()}-")


# --- before the run -------------------------------------------------------------------------------


def refuse_bad_arguments(catalog: Any, store: Path, export: Path | None, chunk_rows: int, device: str,
                         precision: str) -> None:
    """Everything refused before a catalog is read. Two of catalog, store and export that are one
    file would lose data with exit 0 (the export written over the catalog or the store). The
    store's lock file and DuckDB's write-ahead log count as the store; a catalog that is a table
    of the store's database is not an overlap: the store's tables join it there."""
    if isinstance(catalog, DatabaseTable):
        catalog = None if in_store(catalog, store) else catalog.database
    files = [("--catalog", catalog, ""), ("--store", store, ""),
             ("--store", lock_path(store), " (the store's lock file)"),
             ("--store", store.with_name(store.name + ".wal"), " (the store's write-ahead log)"),
             ("--export", export, "")]
    seen: dict[Path, tuple[str, str]] = {}
    for option, path, role in files:
        if not isinstance(path, (str, Path)):
            continue  # no export, or a catalog given as a data frame
        resolved = Path(path).resolve()
        if resolved in seen:
            first, first_role = seen[resolved]
            raise RescoreError(f"{first} and {option} are the same file, {resolved}{first_role or role}; "
                               "use a different path for each")
        seen[resolved] = (option, role)
    if export is not None and export.suffix.lower() not in (".parquet", ".pq"):
        raise RescoreError(f"{export}: --export writes Parquet; use a .parquet file name")
    if store.is_dir():
        raise RescoreError(f"{store}: is a directory; --store is a DuckDB file")
    if chunk_rows < 1:
        raise RescoreError("chunk_rows must be at least 1")
    check_choice("device", device, DEVICES)
    check_choice("precision", precision, PRECISIONS)


def read_catalog_rows(catalog: Any, run: Run, wait: float) -> pl.DataFrame:
    """The catalog's rows, with the run's key column; a table of a database that another process
    has open is waited for, as the store is."""
    if isinstance(catalog, DatabaseTable):
        rows = waiting_while_open_elsewhere(lambda: read_catalog(catalog, name=run.catalog), catalog.database,
                                            f"--catalog {run.catalog} cannot be read", wait)
    else:
        rows = read_catalog(catalog, name=run.catalog)
    if run.key not in rows.columns:
        raise RescoreError(f"{run.catalog}: no key column {run.key!r} (it has: {', '.join(rows.columns)}); "
                           "pass --key COLUMN")
    return rows


def make_store_directory(store: Path) -> None:
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a read-only directory, or a parent that is a file
        reason = "it exists and is not a directory" if isinstance(exc, FileExistsError) else exc.strerror or exc
        raise RescoreError(f"{store.parent}: cannot create the store's directory: {reason}") from exc


# --- the phases -----------------------------------------------------------------------------------


def plan(con: duckdb.DuckDBPyConnection, run: Run, rows: pl.DataFrame, choices: list[ModelChoice], *,
         shared: bool, wait: float, export: bool, allow_shrink: bool, dry_run: bool) -> None:
    """The store read-only (``shared``: it is the catalog's own database), the catalog hashed
    (rescore_input) and checked, the rows to score listed (rescore_todo), the catalog's
    fingerprint; then the guards that need the plan. A dry run also counts what it would do."""
    con.execute(NO_PROGRESS_BAR)
    con.register("rescore_catalog_df", rows)
    con.execute(f"CREATE TEMP VIEW rescore_catalog AS SELECT {quote_ident(run.key)} AS key, "
                f"{', '.join(INPUT_COLUMNS)} FROM rescore_catalog_df")
    _run(con, "macros")
    with store_for_planning(con, run.store, wait, shared=shared):
        start(con, run, choices)
        pause("plan")
        _run(con, "input")
        # The catalog is in rescore_input now: its own memory is freed.
        con.execute("DROP VIEW rescore_catalog")
        con.unregister("rescore_catalog_df")
        _run(con, "checks")
        _run(con, "plan")
        _run(con, "fingerprint")
        if export:
            refuse_key_collision(con, run.key)
        if not allow_shrink:
            refuse_shrink(con, run)
        if dry_run:
            _run(con, "counts")


def resume_unfinished(con: duckdb.DuckDBPyConnection, run: Run, choices: list[ModelChoice],
                      previous: dict[str, Any]) -> dict[str, Any]:
    """This run's work (catalog fingerprint and model ids). Where the lock file says the same
    work failed from its COMMIT on, the run takes that run's id, so it is recorded once."""
    work = {"catalog_fingerprint": catalog_fingerprint(con), "model_ids": [c.model_id for c in choices]}
    if previous.get("unfinished") == work:
        run.id = previous["run_id"]
        set_variable(con, "rescore_run_id", run.id)
    return work


def score(con: duckdb.DuckDBPyConnection, choices: list[ModelChoice], level: float | None, progress: bool | None,
          chunk_rows: int, device: str, precision: str, work_dir: Path) -> None:
    """Score every row of rescore_todo into rescore_new, streaming: ``chunk_rows`` keys at a
    time are read, scored by each model that must score them, and appended to a Parquet
    file in ``work_dir``, which then fills rescore_new. Memory stays that of a chunk,
    whatever the catalog's size, and the models that score a chunk's same rows share their Rows
    (each synopsis cleaned, hashed and read from the cache once). With a ``level``, each score's
    interval at it comes from the same pass."""
    todo_counts = dict(con.execute("SELECT model_id, count(*) FROM rescore_todo GROUP BY model_id").fetchall())
    choices = [c for c in choices if todo_counts.get(c.model_id)]
    if not choices:
        return
    from tqdm.auto import tqdm

    from anime_udf.cache import EmbeddingCache
    from anime_udf.scoring import load_scorer  # torch and transformers: only when there is work

    cache = EmbeddingCache()
    scorers = [load_scorer(c.path, cache=cache, device=device, precision=precision) for c in choices]
    # One query streams the rows (the connection runs nothing else until it is read), so the
    # scores go to a file and enter rescore_new afterwards. todo_<i>: model i must score the key.
    todo_flags = ", ".join(f"bool_or(model_id = ?) AS todo_{i}" for i in range(len(choices)))
    rows = con.sql(
        f"SELECT t.*, i.synopsis, i.genres, i.studio, i.episodes FROM (SELECT key, {todo_flags} FROM "
        "rescore_todo GROUP BY key) t JOIN rescore_input i USING (key)", params=[c.model_id for c in choices]
    ).to_arrow_reader(chunk_rows)
    scored_file = work_dir / "scored.parquet"
    bar = tqdm(total=sum(todo_counts[c.model_id] for c in choices), unit="row",
               desc=f"scoring ({', '.join(c.kind for c in choices)})",
               disable=None if progress is None else not progress, file=sys.stderr)
    try:
        with pq.ParquetWriter(scored_file, SCORED_SCHEMA) as writer:
            for chunk, tables in enumerate(in_order(rows, lambda batch: score_chunk(batch, choices, scorers, level))):
                for table in tables:
                    writer.write_table(table)
                    bar.update(table.num_rows)
                if chunk == 0:
                    pause("score")  # the first chunk's scores are written
        con.execute("INSERT INTO rescore_new SELECT model_id, key, score, lo, hi FROM read_parquet(?)",
                    [str(scored_file)])
    finally:
        bar.close()


def in_order(batches: Iterable[T], work: Callable[[T], R]) -> Iterator[R]:
    """``work`` of each batch, SCORING_THREADS batches at once, in the batches' order."""
    in_flight: deque[Future[R]] = deque()
    with ThreadPoolExecutor(SCORING_THREADS) as pool:
        for batch in batches:
            in_flight.append(pool.submit(work, batch))
            if len(in_flight) == SCORING_THREADS:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


def score_chunk(batch: pa.RecordBatch, choices: list[ModelChoice], scorers: list[Scorer],
                level: float | None) -> list[pa.Table]:
    """A chunk's scores (and intervals at ``level``), a table per model with rows to score (column
    ``todo_<i>``: model i must score the row). Models that must score the same rows share one
    Rows: each synopsis is cleaned, hashed and read from the cache once."""
    from anime_udf.scoring import Rows

    same_rows: dict[bytes, list[int]] = {}
    for i in range(len(choices)):
        todo = batch.column(f"todo_{i}").to_numpy(zero_copy_only=False)
        same_rows.setdefault(todo.tobytes(), []).append(i)
    tables = []
    for models in same_rows.values():
        part = batch.filter(batch.column(f"todo_{models[0]}"))
        if part.num_rows == 0:
            continue
        inputs = Rows(*(part.column(c).to_pylist() for c in INPUT_COLUMNS))
        tables += [pa.table({"model_id": pa.repeat(choices[i].model_id, part.num_rows), "key": part.column("key"),
                             **scores_of(scorers[i], inputs, level)}, schema=SCORED_SCHEMA) for i in models]
    return tables


def scores_of(scorer: Scorer, inputs: Rows, level: float | None) -> dict[str, Any]:
    """score, lo and hi of each row (lo and hi NULL without a level), from one pass."""
    if level is None:
        return {"score": scorer.predict_rows(inputs), "lo": pa.nulls(len(inputs)), "hi": pa.nulls(len(inputs))}
    return dict(zip(("score", "lo", "hi"), scorer.predict_rows_with_interval(inputs, [level] * len(inputs))))


def apply(con: duckdb.DuckDBPyConnection, store: Path, wait: float) -> None:
    """The store read-write and the one transaction that changes it, up to its COMMIT: a
    failure rolls it back, leaving the store unchanged."""
    attach(con, store, read_only=False, wait=max(wait, APPLY_WAIT_SECONDS))
    has_store_tables(con, store)  # a user's table of a store table's name, created while the store was closed
    _run(con, "begin")
    try:
        _run(con, "schema")  # a new store gets its tables in its first run's transaction
        _run(con, "counts")
        _run(con, "apply")
        _run(con, "record")
        pause("commit")
    except BaseException:
        with suppress(duckdb.Error):  # the failed statement may have ended the transaction already
            con.execute("ROLLBACK")
        raise


def publish(con: duckdb.DuckDBPyConnection, run: Run, export: Path | None, work: dict[str, Any]) -> RunRecord:
    """COMMIT, then the export, then close the store. From COMMIT on, a failure may leave the
    run applied: it says what is known, and notes the run so that a retry of the same
    ``work`` does not record it twice."""
    step = "COMMIT"
    try:
        _run(con, "commit")
        step = "reading the run record"
        records = run_records(con, run.id)
        export_rows = None
        if export is not None:
            step = f"writing {export}"
            export_rows = write_export(con, export, run.key)
        step = "closing the store (its checkpoint)"
        detach(con)
    except (duckdb.Error, OSError) as exc:
        with suppress(duckdb.Error):  # the store may be detached or unusable already
            detach(con)
        note_unfinished(run.store, run.id, work)
        outcome = (f"may or may not have been applied to {run.store}: COMMIT failed: {exc}. It was applied "
                   f"if SELECT * FROM rescore_runs WHERE run_id = '{run.id}' returns rows"
                   if step == "COMMIT" else f"was committed to {run.store}, but {step} failed: {exc}")
        raise RescoreError(f"run {run.id} {outcome}. Rerun the same command: it completes the work and "
                           f"records run {run.id} once") from exc
    return run_record(run, records, export=str(export) if export is not None else None,
                      export_rows=export_rows)


# --- the export -----------------------------------------------------------------------------------


def export_query() -> str:
    return sql_sections()["export"].strip().rstrip(";")


def refuse_key_collision(con: duckdb.DuckDBPyConnection, key: str) -> None:
    """Refuse a key column named like a column the export adds (``model``, ``run_id``,
    ...): renaming ``key`` to it would give the export two columns of that name. Read
    from the export query itself (on the planned tables), so the list cannot go stale."""
    columns = [d[0] for d in con.execute(f"SELECT * FROM ({export_query()}) LIMIT 0").description]
    clash = next((c for c in columns if c != "key" and c.lower() == key.lower()), None)
    if clash is not None:
        raise RescoreError(f"--key {key}: the export has a {clash} column of its own ({', '.join(columns[1:])}); "
                           "rename the catalog's key column, or run without --export")


def write_export(con: duckdb.DuckDBPyConnection, path: Path, key: str) -> int:
    """Write the export query's result to ``path`` atomically (temporary file + rename)."""
    rename = f" RENAME (key AS {quote_ident(key)})" if key != "key" else ""
    with atomic_file(path) as tmp:
        n = con.execute(f"COPY (SELECT *{rename} FROM ({export_query()})) TO {quote_literal(tmp)} "
                        "(FORMAT parquet)").fetchone()[0]
        pause("export")
    return int(n)
