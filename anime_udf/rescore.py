"""Nightly batch rescoring: incremental, crash-safe, and recorded.

``rescore(catalog, store)`` keeps, in a DuckDB file (the *store*), one score per
(catalog key, model id) together with the hash of the inputs it was computed from.
A run scores only the rows whose inputs changed or that the model never scored, and
applies everything in one transaction. The statements are those of
``sql/rescore.sql``; this module runs them section by section and does the ``score``
step in Python (chunked, with a progress bar), so the CLI and the SQL agree.

A run, in order:

1. take the store's lock file (``STORE.lock``, an ``flock``: released by the kernel
   when the process dies, so a killed run never leaves a stale lock);
2. *plan*: open the store read-only, hash the catalog's inputs in SQL, list the rows
   each model must score, then close the store again, so that readers can open it
   while the slow scoring runs;
3. *score* those rows, streamed in chunks (so memory does not grow with the catalog),
   into a temporary table (the embedding cache keeps each encoded synopsis, so a killed
   run's work is not lost); the run's DuckDB spills to a temporary directory beyond
   ``WORK_MEMORY_LIMIT``;
4. *apply*: open the store read-write and, in one transaction, delete keys gone from
   the catalog (their rows of every kind) and rows of superseded bundles, upsert the
   new scores, append the run record; COMMIT;
5. *export* (optional): write Parquet to a hidden temporary file, fsync, rename.

A crash before COMMIT leaves the store as the previous run left it; after COMMIT, as
this run left it. The next run completes the work. A failure from COMMIT on (DuckDB
can make a COMMIT durable in its write-ahead log and then fail to checkpoint, e.g. on
a full disk) is noted in the lock file: the next run of the same work reuses that
run's id, so the run is recorded once whether or not the COMMIT took effect.

Test hook: ``ANIME_UDF_RESCORE_PAUSE_AT=<phase>`` (plan, score, commit, export) makes a
run print ``rescore: paused at <phase>`` to stderr and sleep
``ANIME_UDF_RESCORE_PAUSE_SECONDS`` (default 3600) at that point, so that a test can
``kill -9`` it at a known place: ``score`` is after the first scored chunk, ``commit``
inside the transaction just before COMMIT, ``export`` before the rename.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from anime_udf.errors import AnimeUdfError
from anime_udf.bundle import KINDS, read_manifest
from anime_udf.catalog import DatabaseTable, catalog_source, read_catalog
from anime_udf.columns import DEFAULT_KEY, INPUT_COLUMNS
from anime_udf.devices import DEVICES, PRECISIONS, check_choice
from anime_udf.files import atomic_file
from anime_udf.registry import get_model, newest, resolve_models_dir
from anime_udf.sqlutil import quote_ident, quote_literal, sql_path

SQL_FILE = "rescore.sql"
PAUSE_ENV = "ANIME_UDF_RESCORE_PAUSE_AT"
PAUSE_SECONDS_ENV = "ANIME_UDF_RESCORE_PAUSE_SECONDS"
PHASES = ("plan", "score", "commit", "export")
SCHEMA_VERSION = "1"
# Rows scored at a time: large enough that the vectorised steps (lexical view, tabular
# features, cache look-ups, the heads) run at full speed, small enough to bound memory.
CHUNK_ROWS = 4096
# What the run's own DuckDB (the catalog's hashes, the plan, the new scores) may hold in
# memory; beyond it, its temporary tables spill to a temporary directory.
WORK_MEMORY_LIMIT = "1GB"
# Once the rows are scored, opening the store to apply them waits at least this long
# for a reader to close it: failing there would throw the scoring away.
APPLY_WAIT_SECONDS = 60.0
# Manifest entries that describe a bundle without changing its predictions: they do
# not enter the model id, so a copied or renamed bundle keeps its scores.
DESCRIPTIVE_MANIFEST_KEYS = frozenset({"created_at", "name", "metrics", "training"})
QUANTILES = ("p05", "p25", "p50", "p75", "p95")
# A run may remove at most this share of the keys the store holds (of any kind: a
# removed key loses every kind's rows) without --allow-shrink: a truncated or
# header-only catalog is far likelier than a catalog that really lost most of its rows.
SHRINK_LIMIT = 0.5
# A chunk of scores, as _score writes them to its work directory.
SCORED_SCHEMA = pa.schema([("model_id", pa.string()), ("key", pa.string()), ("score", pa.float64())])
# Columns of rescore_runs that are the same for every model of a run: reported once.
RUN_WIDE_COLUMNS = ("started_at", "finished_at", "seconds", "catalog_fingerprint", "rows_seen", "rows_imputed")


class RescoreError(AnimeUdfError, RuntimeError):
    """A rescore run cannot start or cannot finish; the store is left as it was."""


class StoreBusyError(RescoreError):
    """Another process holds the store."""


# --- models ---------------------------------------------------------------------------


def model_id(bundle: Path | str, manifest: dict[str, Any] | None = None) -> str:
    """``<kind>-<12 hex>``: a hash of everything in the bundle that affects its scores
    (every file's sha256, vocabularies, scalers, architecture, text encoder checksum).
    A retrained bundle gets a new id even under the same name; a copy keeps its id."""
    manifest = manifest if manifest is not None else read_manifest(bundle, verify=False)
    relevant = {k: v for k, v in manifest.items() if k not in DESCRIPTIVE_MANIFEST_KEYS}
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"{manifest['kind']}-{digest[:12]}"


@dataclass(frozen=True)
class ModelChoice:
    kind: str
    path: Path
    model_id: str


def resolve_models(specs: str | Sequence[str], directory: Path | str | None = None) -> list[ModelChoice]:
    """``all`` (the newest bundle of each kind present), a kind (its newest bundle), or
    bundle names/paths. Every bundle's files are checked against its manifest."""
    specs = [specs] if isinstance(specs, str) else list(specs) or ["all"]
    paths: list[Path] = []
    for spec in specs:
        if spec == "all":
            found = [p for p in (newest(kind, directory) for kind in KINDS) if p is not None]
            if not found:
                raise RescoreError(
                    f"no model bundles in {resolve_models_dir(directory).resolve()}; train one with "
                    "`anime-udf train baseline --data CATALOG`, or pass --models DIR")
            paths.extend(found)
        elif spec in KINDS:
            path = newest(spec, directory)
            if path is None:
                raise RescoreError(f"no {spec} bundle in {resolve_models_dir(directory).resolve()}; "
                                   f"train one with `anime-udf train {spec} --data CATALOG`, or pass --models DIR")
            paths.append(path)
        else:
            paths.append(get_model(spec, directory))
    choices: dict[str, ModelChoice] = {}
    for path in paths:
        manifest = read_manifest(path)  # verifies every file's checksum
        kind = manifest["kind"]
        if kind in choices and choices[kind].path.resolve() != path.resolve():
            raise RescoreError(f"two {kind} bundles chosen ({choices[kind].path} and {path}); "
                               "a store keeps one model of each kind")
        choices[kind] = ModelChoice(kind, path, model_id(path, manifest))
    return [choices[k] for k in KINDS if k in choices]


# --- the SQL ----------------------------------------------------------------------------


@lru_cache(maxsize=1)
def sql_sections() -> dict[str, str]:
    """The sections of sql/rescore.sql, by name (``-- @section NAME`` lines); read once."""
    sections: dict[str, str] = {}
    name = None
    for line in sql_path(SQL_FILE).read_text().splitlines():
        match = re.fullmatch(r"--\s*@section\s+(\w+)\s*", line)
        if match:
            name = match.group(1)
            sections[name] = ""
        elif name is not None:
            sections[name] += line + "\n"
    return sections


def _run(con: duckdb.DuckDBPyConnection, section: str) -> None:
    con.execute(sql_sections()[section])


def _set(con: duckdb.DuckDBPyConnection, name: str, value: Any, cast: str = "") -> None:
    con.execute(f"SET VARIABLE {name} = ?{cast}", [value])


def _set_run(con: duckdb.DuckDBPyConnection, run_id: str, started: dt.datetime, key: str, catalog: str) -> None:
    """The run's variables that sql/rescore.sql reads."""
    _set(con, "rescore_run_id", run_id)
    _set(con, "rescore_started_at", started.isoformat(), "::TIMESTAMPTZ")
    _set(con, "rescore_key_column", key)
    _set(con, "rescore_catalog", catalog)


def _add_models(con: duckdb.DuckDBPyConnection, choices: list[ModelChoice]) -> None:
    """The chosen models into rescore_models (sql/rescore.sql's model section, once each)."""
    for choice in choices:
        _set(con, "rescore_model_id", choice.model_id)
        _set(con, "rescore_model_kind", choice.kind)
        _set(con, "rescore_bundle", str(choice.path))
        _run(con, "model")


# --- locking and opening the store --------------------------------------------------------


def lock_path(store: Path) -> Path:
    return store.with_name(store.name + ".lock")


@contextmanager
def store_lock(store: Path, wait: float = 0.0, run_id: str = "") -> Iterator[dict[str, Any]]:
    """Hold ``STORE.lock`` (an exclusive ``flock``) for a run; wait up to ``wait``
    seconds for another run to finish, then fail naming it. The kernel releases the
    lock when the holder exits or is killed, so it is never stale. Yields what the
    previous holder left in the file (see ``_note_unfinished``)."""
    import fcntl  # POSIX only, like the rest of the scheduler setting

    path = lock_path(store)
    try:
        fh = open(path, "a+")
    except OSError as exc:  # a read-only directory, or a lock path that is not a file
        raise RescoreError(f"{path}: cannot create or open the store's lock file: "
                           f"{exc.strerror or exc}") from exc
    with fh:  # closing the descriptor releases the flock
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if time.monotonic() >= deadline:
                    raise StoreBusyError(
                        f"{store} is being rescored by another run ({_holder(path)}); "
                        + (f"gave up after waiting {wait:g} s" if wait > 0
                           else "pass --wait SECONDS to wait for it")) from None
                time.sleep(0.2)
        previous = _lock_info(path)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "run_id": run_id, "since": _now().isoformat(timespec="seconds")}))
        fh.flush()
        yield previous


def _lock_info(path: Path) -> dict[str, Any]:
    """What the lock file says about its (last) holder; {} where it says nothing readable."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _holder(path: Path) -> str:
    info = _lock_info(path)
    if not info:
        return "holder unknown"
    return f"pid {info.get('pid', '?')}, run {info.get('run_id', '?')}, since {info.get('since', '?')}"


def _note_unfinished(store: Path, run_id: str, work: dict[str, Any]) -> None:
    """Note in the (held) lock file that ``run_id`` failed from its COMMIT on, so that a
    retry of the same ``work`` reuses the id. Written over the old text before cutting
    it, so the file keeps its disk block and this works on a full disk; if it fails
    all the same, a retry records the run once more, which is all that is lost."""
    with suppress(OSError), open(lock_path(store), "r+") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "run_id": run_id, "since": _now().isoformat(timespec="seconds"),
                             "unfinished": work}))
        fh.truncate()


def _refuse_overlaps(catalog: Any, store: Path, export: Path | None) -> None:
    """Two of catalog, store and export that are one file would lose data with exit 0
    (the export written over the catalog or the store): refuse before anything is read.
    The store's lock file and DuckDB's write-ahead log count as the store. A catalog that
    is a table of the store's database is not an overlap: the store's tables join it there."""
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


def _attach(con: duckdb.DuckDBPyConnection, store: Path, *, read_only: bool, wait: float) -> None:
    """ATTACH the store as ``store`` and USE it; wait up to ``wait`` s while another
    process (a reader, or a writer that is not a rescore run) has it open."""
    mode = " (READ_ONLY)" if read_only else ""
    deadline = time.monotonic() + max(wait, 0.0)
    while True:
        try:
            con.execute(f"ATTACH {quote_literal(store)} AS store{mode}")
            break
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                raise RescoreError(f"{store}: cannot open the store: {exc}") from exc
            if time.monotonic() >= deadline:
                raise StoreBusyError(
                    f"{store} is open in another process, so it cannot be "
                    f"{'read' if read_only else 'updated'}: {exc}"
                    + (f" (gave up after waiting {wait:g} s)" if wait > 0
                       else "; pass --wait SECONDS to wait for it")) from exc
            time.sleep(0.25)
        except duckdb.Error as exc:
            raise RescoreError(f"{store}: cannot open the store (not a DuckDB database?): {exc}") from exc
    con.execute("USE store")


def _detach(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("USE memory")
    con.execute("DETACH store")


def in_store(catalog: Any, store: Path) -> bool:
    """Whether the catalog is a table of the store's own database (a warehouse file holding both)."""
    return isinstance(catalog, DatabaseTable) and catalog.database.resolve() == store.resolve()


def _has_tables(con: duckdb.DuckDBPyConnection, shared: bool) -> bool:
    """Whether the attached store has its tables; other tables are allowed only in a ``shared``
    store (the catalog's own database), so that a run never writes into an unrelated database."""
    names = {r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = 'store'").fetchall()}
    if "rescore_scores" not in names:
        if names and not shared:
            raise RescoreError("the store has tables but no rescore_scores: it is not a rescore store (a "
                               "database's own tables may share it with the store only when the catalog is "
                               "one of them: --catalog FILE.duckdb:TABLE --store FILE.duckdb)")
        return False
    row = con.execute("SELECT value FROM store.rescore_meta WHERE name = 'schema_version'").fetchone()
    if row and row[0] != SCHEMA_VERSION:
        raise RescoreError(f"the store has rescore schema version {row[0]}; this anime-udf writes "
                           f"version {SCHEMA_VERSION}")
    return True


@contextmanager
def _store_for_planning(con: duckdb.DuckDBPyConnection, store: Path, wait: float,
                        shared: bool = False) -> Iterator[bool]:
    """The store read-only, or an empty in-memory one where it has no tables yet (a
    first run, or a first run killed before its COMMIT). Yields whether it exists.
    ``shared``: the store is the catalog's database, which has tables of its own."""
    exists = False
    if store.exists():
        _attach(con, store, read_only=True, wait=wait)
        try:
            exists = _has_tables(con, shared)
        except RescoreError as exc:
            _detach(con)
            raise RescoreError(f"{store}: {exc}") from exc
        if not exists:
            _detach(con)
    if not exists:
        con.execute("ATTACH ':memory:' AS store")
        con.execute("USE store")
        _run(con, "schema")
    try:
        yield exists
    finally:
        _detach(con)


# --- a run ----------------------------------------------------------------------------------


@dataclass
class RunReport:
    run_id: str
    status: str  # "ok" or "dry-run"
    store: str
    catalog: str
    key: str
    started_at: str
    finished_at: str
    seconds: float
    catalog_fingerprint: str
    rows_seen: int
    rows_imputed: int
    models: list[dict[str, Any]] = field(default_factory=list)
    export: str | None = None
    export_rows: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pause(phase: str) -> None:
    """The test hook described in the module docstring."""
    if os.environ.get(PAUSE_ENV) == phase:
        sys.stderr.write(f"rescore: paused at {phase} (pid {os.getpid()})\n")
        sys.stderr.flush()
        time.sleep(float(os.environ.get(PAUSE_SECONDS_ENV) or 3600))


def rescore(
    catalog: Any,
    store: Path | str,
    *,
    models: str | Sequence[str] = ("all",),
    models_dir: Path | str | None = None,
    key: str = DEFAULT_KEY,
    export: Path | str | None = None,
    dry_run: bool = False,
    wait: float = 0.0,
    progress: bool | None = None,
    chunk_rows: int = CHUNK_ROWS,
    allow_shrink: bool = False,
    device: str = "auto",
    precision: str = "auto",
) -> RunReport:
    """Rescore ``catalog`` (a path, ``FILE.duckdb:TABLE`` or anything ``read_catalog`` takes)
    into ``store``, a DuckDB file: its own, or the catalog's database (its rescore_* tables
    then sit beside the warehouse's, changed by the same one transaction a run).

    ``models``: ``all``, ``baseline``, ``fusion`` or bundle names/paths. ``wait``:
    seconds to wait for a concurrent run (or another process holding the store) before
    failing; applying the scored rows waits at least ``APPLY_WAIT_SECONDS``.
    ``progress``: a progress bar on stderr (None: only on a terminal). ``allow_shrink``:
    apply a run that removes more than ``SHRINK_LIMIT`` of the stored keys (refused
    otherwise, dry runs included). ``device``, ``precision``: the text encoder's, as for
    ``anime_udf.register``. Raises RescoreError (StoreBusyError for a held
    store) with the store unchanged, except where its message says that the COMMIT
    failed or that something after it did. Returns the run's report.
    """
    started = _now()
    clock = time.perf_counter()
    store = Path(store)
    if isinstance(catalog, (str, Path)):
        catalog = catalog_source(catalog)  # a file, or a table of a DuckDB database
    export = Path(export) if export is not None else None
    _refuse_overlaps(catalog, store, export)
    if export is not None and export.suffix.lower() not in (".parquet", ".pq"):
        raise RescoreError(f"{export}: --export writes Parquet; use a .parquet file name")
    if store.is_dir():
        raise RescoreError(f"{store}: is a directory; --store is a DuckDB file")
    if chunk_rows < 1:
        raise RescoreError("chunk_rows must be at least 1")
    check_choice("device", device, DEVICES)
    check_choice("precision", precision, PRECISIONS)
    choices = resolve_models(models, models_dir)
    label = str(catalog) if isinstance(catalog, (str, Path, DatabaseTable)) else type(catalog).__name__
    df = read_catalog(catalog, name=label)
    if key not in df.columns:
        raise RescoreError(f"{label}: no key column {key!r} (it has: {', '.join(df.columns)}); pass --key COLUMN")
    if not dry_run:
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. a read-only directory, or a parent that is a file
            reason = "it exists and is not a directory" if isinstance(exc, FileExistsError) else exc.strerror or exc
            raise RescoreError(f"{store.parent}: cannot create the store's directory: {reason}") from exc
    run_id = started.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)

    work_dir = tempfile.TemporaryDirectory(prefix="anime-udf-rescore-")
    con = duckdb.connect(config={"temp_directory": work_dir.name, "memory_limit": WORK_MEMORY_LIMIT})
    try:
        # No DuckDB progress bar: it would print to stdout (into --json) while the scoring streams.
        con.execute("SET enable_progress_bar = false")
        _register_catalog(con, df, key)
        del df  # the plan copies what it needs; the catalog's text is not held twice
        _run(con, "macros")
        _set_run(con, run_id, started, key, label)
        with nullcontext({}) if dry_run else store_lock(store, wait, run_id) as previous:
            with _store_for_planning(con, store, wait, shared=in_store(catalog, store)):
                _run(con, "start")
                _add_models(con, choices)
                _pause("plan")
                _run(con, "plan")
                _release_catalog(con)
                _run(con, "fingerprint")
                if export is not None:
                    _refuse_key_collision(con, key)
                if not allow_shrink:
                    _refuse_shrink(con, label, store)
                if dry_run:
                    _run(con, "counts")
                    return _dry_run_report(con, run_id, store, label, key, started, clock)
            fingerprint = con.execute("SELECT getvariable('rescore_catalog_fingerprint')").fetchone()[0]
            work = {"catalog_fingerprint": fingerprint, "model_ids": [c.model_id for c in choices]}
            if previous.get("unfinished") == work:  # a retry: the run is recorded once, under its first id
                run_id = previous["run_id"]
                _set(con, "rescore_run_id", run_id)
            _score(con, choices, progress, chunk_rows, device, precision, Path(work_dir.name))
            _attach(con, store, read_only=False, wait=max(wait, APPLY_WAIT_SECONDS))
            _apply(con)
            # From COMMIT on, a failure may leave the run applied: say what is known, and note
            # the run so that a retry of the same work does not record it twice.
            step = "COMMIT"
            try:
                _run(con, "commit")
                step = "reading the run record"
                records = con.sql(
                    "SELECT * EXCLUDE (catalog, key_column, run_id) FROM rescore_runs "
                    "WHERE run_id = ? ORDER BY model_kind", params=[run_id]).pl().to_dicts()
                export_rows = None
                if export is not None:
                    step = f"writing {export}"
                    export_rows = _export(con, export, key)
                step = "closing the store (its checkpoint)"
                _detach(con)
            except (duckdb.Error, OSError) as exc:
                with suppress(duckdb.Error):  # the store may be detached or unusable already
                    _detach(con)
                _note_unfinished(store, run_id, work)
                outcome = (f"may or may not have been applied to {store}: COMMIT failed: {exc}. It was applied "
                           f"if SELECT * FROM rescore_runs WHERE run_id = '{run_id}' returns rows"
                           if step == "COMMIT" else f"was committed to {store}, but {step} failed: {exc}")
                raise RescoreError(f"run {run_id} {outcome}. Rerun the same command: it completes the work and "
                                   f"records run {run_id} once") from exc
        return run_report(records, run_id, store, label, key, started, clock,
                          export=str(export) if export is not None else None, export_rows=export_rows)
    except duckdb.Error as exc:
        message = str(exc)
        if "rescore: " in message:  # a guard of sql/rescore.sql: its own words suffice
            message = message.split("rescore: ", 1)[1]
        raise RescoreError(f"rescore failed, the store is unchanged: {message}") from exc
    finally:
        con.close()
        work_dir.cleanup()


def _register_catalog(con: duckdb.DuckDBPyConnection, df: pl.DataFrame, key: str) -> None:
    """The catalog as sql/rescore.sql's ``rescore_catalog`` view: the key and the four inputs."""
    con.register("rescore_catalog_df", df)
    con.execute(f"CREATE TEMP VIEW rescore_catalog AS SELECT {quote_ident(key)} AS key, "
                f"{', '.join(INPUT_COLUMNS)} FROM rescore_catalog_df")


def _release_catalog(con: duckdb.DuckDBPyConnection) -> None:
    """Drop the catalog once the plan has copied it (rescore_input): its memory is freed."""
    con.execute("DROP VIEW rescore_catalog")
    con.unregister("rescore_catalog_df")


def run_report(records: list[dict[str, Any]], run_id: str, store: Path, label: str, key: str,
               started: dt.datetime, clock: float, **export: Any) -> RunReport:
    """The report of a finished run, from its rows of rescore_runs (one per model)."""
    first = records[0]
    return RunReport(
        run_id=run_id, status="ok", store=str(store), catalog=label, key=key,
        started_at=started.isoformat(timespec="seconds"), finished_at=_now().isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - clock, 3),
        catalog_fingerprint=first["catalog_fingerprint"], rows_seen=first["rows_seen"],
        rows_imputed=first["rows_imputed"],
        models=[{k: v for k, v in r.items() if k not in RUN_WIDE_COLUMNS} for r in records],
        **export,
    )


def _apply(con: duckdb.DuckDBPyConnection) -> None:
    """The one transaction that changes the store, up to its COMMIT: a failure rolls
    it back, leaving the store unchanged."""
    _run(con, "begin")
    try:
        _run(con, "schema")  # a new store gets its tables in its first run's transaction
        _run(con, "counts")
        _run(con, "apply")
        _run(con, "record")
        _pause("commit")
    except BaseException:
        with suppress(duckdb.Error):  # the failed statement may have ended the transaction already
            con.execute("ROLLBACK")
        raise


def _refuse_key_collision(con: duckdb.DuckDBPyConnection, key: str) -> None:
    """Refuse a key column named like a column the export adds (``model``, ``run_id``,
    ...): renaming ``key`` to it would give the export two columns of that name. Read
    from the export query itself (on the planned tables), so the list cannot go stale."""
    query = sql_sections()["export"].strip().rstrip(";")
    columns = [d[0] for d in con.execute(f"SELECT * FROM ({query}) LIMIT 0").description]
    clash = next((c for c in columns if c != "key" and c.lower() == key.lower()), None)
    if clash is not None:
        raise RescoreError(f"--key {key}: the export has a {clash} column of its own ({', '.join(columns[1:])}); "
                           "rename the catalog's key column, or run without --export")


def _refuse_shrink(con: duckdb.DuckDBPyConnection, label: str, store: Path) -> None:
    """Refuse a run that would remove more than SHRINK_LIMIT of the keys the store holds,
    of any kind: a key gone from the catalog loses its rows of every kind, the kinds
    this run does not score included."""
    held, gone = con.execute(
        "SELECT count(*), count(*) FILTER (key NOT IN (SELECT key FROM rescore_input)) FROM "
        "(SELECT DISTINCT key FROM rescore_scores)"
    ).fetchone()
    if gone > held * SHRINK_LIMIT:
        raise RescoreError(
            f"{label} would remove {gone} of the {held} keys {store} holds (more than {SHRINK_LIMIT:.0%}); "
            "is the catalog complete? Pass --allow-shrink to remove them")


def _score(con: duckdb.DuckDBPyConnection, choices: list[ModelChoice], progress: bool | None, chunk_rows: int,
           device: str, precision: str, work_dir: Path) -> None:
    """Score every row of rescore_todo into rescore_new, streaming: ``chunk_rows`` keys at a
    time are read, scored by each model that must score them, and appended to a Parquet
    file in ``work_dir``, which then fills rescore_new. Memory stays that of a chunk,
    whatever the catalog's size, and the models of a chunk share its cache reads."""
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
    scored = work_dir / "scored.parquet"
    bar = tqdm(total=sum(todo_counts[c.model_id] for c in choices), unit="row",
               desc=f"scoring ({', '.join(c.kind for c in choices)})",
               disable=None if progress is None else not progress, file=sys.stderr)
    first = True
    try:
        with pq.ParquetWriter(scored, SCORED_SCHEMA) as writer:
            for batch in rows:
                with cache.shared_reads():
                    for i, (choice, scorer) in enumerate(zip(choices, scorers)):
                        part = batch.filter(batch.column(f"todo_{i}"))
                        if part.num_rows == 0:
                            continue
                        scores = scorer.predict(*(part.column(c).to_pylist() for c in INPUT_COLUMNS))
                        writer.write_table(pa.table({"model_id": pa.repeat(choice.model_id, part.num_rows),
                                                     "key": part.column("key"), "score": scores},
                                                    schema=SCORED_SCHEMA))
                        bar.update(part.num_rows)
                if first:
                    first = False
                    _pause("score")
        con.execute("INSERT INTO rescore_new SELECT model_id, key, score FROM read_parquet(?)", [str(scored)])
    finally:
        bar.close()


def _export(con: duckdb.DuckDBPyConnection, path: Path, key: str) -> int:
    """Write the export query's result to ``path`` atomically (temporary file + rename)."""
    query = sql_sections()["export"].strip().rstrip(";")
    rename = f" RENAME (key AS {quote_ident(key)})" if key != "key" else ""
    with atomic_file(path) as tmp:
        n = con.execute(f"COPY (SELECT *{rename} FROM ({query})) TO {quote_literal(tmp)} (FORMAT parquet)").fetchone()[0]
        _pause("export")
    return int(n)


def _dry_run_report(con, run_id: str, store: Path, label: str, key: str, started: dt.datetime, clock: float) -> RunReport:
    counts = con.sql("SELECT * FROM rescore_counts ORDER BY model_kind").pl().to_dicts()
    fingerprint = con.execute("SELECT getvariable('rescore_catalog_fingerprint')").fetchone()[0]
    return RunReport(
        run_id=run_id, status="dry-run", store=str(store), catalog=label, key=key,
        started_at=started.isoformat(timespec="seconds"), finished_at=_now().isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - clock, 3), catalog_fingerprint=fingerprint,
        rows_seen=counts[0]["rows_seen"] if counts else 0, rows_imputed=counts[0]["rows_imputed"] if counts else 0,
        models=[{k: v for k, v in c.items() if k not in ("rows_seen", "rows_imputed")} for c in counts],
    )


# --- the summary --------------------------------------------------------------------------------


def _num(value: Any, fmt: str = ".3f", signed: bool = False) -> str:
    if value is None:
        return "-"
    return format(value, ("+" if signed else "") + fmt)


def format_summary(report: RunReport) -> str:
    """One screen for the operator: what was read, scored, reused, removed, and how the
    score distribution moved against the previous run."""
    dry = report.status == "dry-run"
    lines = [
        f"rescore {report.run_id}: " + ("dry run, nothing scored or written" if dry else "ok")
        + f" in {report.seconds:.1f} s",
        (f"catalog  {report.catalog}: {report.rows_seen} rows, {report.rows_imputed} with imputed inputs, "
         f"fingerprint {report.catalog_fingerprint}"),
        f"store    {report.store} (keyed by {report.key})",
    ]
    verbs = ("would score", "reuse", "remove", "supersede") if dry else ("scored", "reused", "removed", "superseded")
    head = f"{'model':9} {'model id':22} " + " ".join(f"{v:>11}" for v in verbs)
    width = len(head)
    if not dry:
        head += "  " + " ".join(f"{c:>6}" for c in ("mean", *QUANTILES))
    lines.append(head)
    for m in report.models:
        counts = (m["rows_scored"], m["rows_reused"], m["rows_removed"], m["rows_superseded"])
        line = f"{m['model_kind']:9} {m['model_id']:22} " + " ".join(f"{c:>11}" for c in counts)
        if dry:
            lines.append(line)
            continue
        figures = [m["score_mean"], *(m["score_" + q] for q in QUANTILES)]
        lines.append(line + "  " + " ".join(f"{_num(v, '.2f'):>6}" for v in figures))
        if m.get("prev_run_id"):
            same = m["prev_model_id"] == m["model_id"]
            label = f"{'':9} shift vs run {m['prev_run_id']} ({'same model' if same else m['prev_model_id']})"
            shifts = [m["shift_mean"], *(m["shift_" + q] for q in QUANTILES)]
            lines.append(f"{label:{width}}  " + " ".join(f"{_num(v, '.2f', True):>6}" for v in shifts))
        else:
            lines.append(f"{'':9} first run of this kind: no shift to report")
    if report.export:
        lines.append(f"export   {report.export}: {report.export_rows} rows")
    return "\n".join(lines)
