"""The store and its lock.

Both engines take the lock: ``STORE.lock`` beside the store's real file (a path through a
link shares it), an exclusive ``flock`` the kernel releases when its holder exits or is
killed, so it is never stale. The DuckDB store is a database file (its own, or the catalog's
warehouse, whose other tables it never writes: its own are recognised by their columns),
attached only to plan (read-only) and to apply, so that readers can open it while the slow
scoring runs. The Spark store is a directory of
snapshots (anime_udf/rescore/on_spark.py).
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import lru_cache
from itertools import zip_longest
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from anime_udf.catalog import CatalogError, DatabaseTable, duckdb_path
from anime_udf.rescore.run import RescoreError, StoreBusyError, now
from anime_udf.rescore.sql import ADDED_COLUMNS, check_schema_version, run_section
from anime_udf.sqlutil import quote_literal


def lock_path(store: Path) -> Path:
    """The lock of the store's real file: a store reached through a link is locked where it lies."""
    real = store.resolve()
    return real.with_name(real.name + ".lock")


@contextmanager
def store_lock(store: Path, wait: float = 0.0, run_id: str = "") -> Iterator[dict[str, Any]]:
    """Hold ``STORE.lock`` (an exclusive ``flock``) for a run; wait up to ``wait``
    seconds for another run to finish, then fail naming it. The kernel releases the
    lock when the holder exits or is killed, so it is never stale. Yields what the
    previous holder left in the file (see ``note_unfinished``)."""
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
        fh.write(json.dumps({"pid": os.getpid(), "run_id": run_id, "since": now().isoformat(timespec="seconds")}))
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


def note_unfinished(store: Path, run_id: str, work: dict[str, Any]) -> None:
    """Note in the (held) lock file that ``run_id`` failed from its COMMIT on, so that a
    retry of the same ``work`` reuses the id. Written over the old text before cutting
    it, so the file keeps its disk block and this works on a full disk; if it fails
    all the same, a retry records the run once more, which is all that is lost."""
    with suppress(OSError), open(lock_path(store), "r+") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "run_id": run_id, "since": now().isoformat(timespec="seconds"),
                             "unfinished": work}))
        fh.truncate()


T = TypeVar("T")


def waiting_while_open_elsewhere(open_file: Callable[[], T], path: Path, cannot: str, wait: float) -> T:
    """``open_file()``, which opens the DuckDB file ``path``, tried again for up to ``wait`` s
    while another process (a reader, or a writer that is not a rescore run) holds the file's
    own lock; then a StoreBusyError saying that ``cannot``."""
    deadline = time.monotonic() + max(wait, 0.0)
    while True:
        try:
            return open_file()
        except (duckdb.IOException, CatalogError) as exc:
            cause = exc.__cause__ if isinstance(exc, CatalogError) else exc  # read_table wraps DuckDB's error
            if not (isinstance(cause, duckdb.IOException) and "lock" in str(cause).lower()):
                raise
            if time.monotonic() >= deadline:
                raise StoreBusyError(
                    f"{path} is open in another process, so {cannot}: {cause}"
                    + (f" (gave up after waiting {wait:g} s)" if wait > 0
                       else "; pass --wait SECONDS to wait for it")) from exc
        time.sleep(0.25)


def attach(con: duckdb.DuckDBPyConnection, store: Path, *, read_only: bool, wait: float) -> None:
    """ATTACH the store as ``store`` and USE it; wait up to ``wait`` s while another
    process has it open."""
    mode = " (READ_ONLY)" if read_only else ""
    try:
        attach_store = f"ATTACH {quote_literal(duckdb_path(store))} AS store{mode}"
        waiting_while_open_elsewhere(lambda: con.execute(attach_store), store,
                                     f"it cannot be {'read' if read_only else 'updated'}", wait)
    except duckdb.IOException as exc:
        raise RescoreError(f"{store}: cannot open the store: {exc}") from exc
    except duckdb.Error as exc:
        raise RescoreError(f"{store}: cannot open the store (not a DuckDB database?): {exc}") from exc
    con.execute("USE store")


def detach(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("USE memory")
    con.execute("DETACH store")


def in_store(catalog: Any, store: Path) -> bool:
    """Whether the catalog is a table of the store's own database (a warehouse file holding both)."""
    return isinstance(catalog, DatabaseTable) and catalog.database.resolve() == store.resolve()


@lru_cache(maxsize=1)
def store_columns() -> dict[str, list[tuple[str, str]]]:
    """The store's tables and their columns (name, type), as sql/rescore.sql's schema creates them."""
    con = duckdb.connect()
    try:
        run_section(con, "schema")
        return _columns(con, "memory")
    finally:
        con.close()


def _columns(con: duckdb.DuckDBPyConnection, database: str) -> dict[str, list[tuple[str, str]]]:
    columns: dict[str, list[tuple[str, str]]] = {}
    for table, column, data_type in con.execute(
            "SELECT table_name, column_name, data_type FROM duckdb_columns() WHERE database_name = ? "
            "AND schema_name = 'main' ORDER BY table_name, column_index", [database]).fetchall():
        columns.setdefault(table, []).append((column, data_type))
    return columns


def has_store_tables(con: duckdb.DuckDBPyConnection, store: Path) -> bool:
    """Whether the attached store has its tables. They are recognised by their columns (all
    three tables, as sql/rescore.sql creates them) and rescore_meta's schema_version: a table
    of one of their names that is not the store's is a user's (in a shared warehouse), never
    written, so it is refused by name."""
    # DuckDB's names ignore case: a user's "RESCORE_META" is the store's rescore_meta.
    tables = {name.lower(): (name, kind) for name, kind in con.execute(
        "SELECT table_name, table_type FROM information_schema.tables "
        "WHERE table_catalog = 'store' AND table_schema = 'main'").fetchall()}
    expected = store_columns()
    present = [name for name in expected if name in tables]
    if not present:
        return False

    def foreign(table: str, reason: str) -> RescoreError:
        return RescoreError(f"{store}: table {table} is not an anime-udf rescore store's ({reason}); "
                            "use another --store")

    found = _columns(con, "store")
    for name in present:
        actual, kind = tables[name]
        reason = "it is a view" if kind == "VIEW" else _column_difference(found[actual], expected[name])
        if kind != "VIEW" and not _column_difference(found[actual], _before_upgrade(name, expected[name])):
            reason = ""  # an earlier version's table, which the run upgrades
        if reason:
            raise foreign(actual, reason)
    missing = [name for name in expected if name not in tables]
    if missing:
        raise foreign(tables[present[0]][0], f"no {' or '.join(missing)} beside it")
    row = con.execute("SELECT value FROM store.rescore_meta WHERE name = 'schema_version'").fetchone()
    if row is None:
        raise foreign("rescore_meta", "it has no schema_version")
    try:
        check_schema_version(row[0])
    except RescoreError as exc:
        raise RescoreError(f"{store}: {exc}") from None
    return True


def _before_upgrade(table: str, columns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A store table's columns as an earlier version made them: without the columns added since."""
    return [c for c in columns if c[0] not in ADDED_COLUMNS.get(table, ())]


def upgrade_views(con: duckdb.DuckDBPyConnection) -> list[str]:
    """For planning on a store of an earlier version (attached read-only, upgraded only when the
    run applies): temporary views of its tables with the columns added since, NULL, as the
    upgrade fills them. Returns the views' names, to drop before the store is written."""
    views, found = [], {name.lower(): columns for name, columns in _columns(con, "store").items()}
    for table, columns in store_columns().items():
        have = {column for column, _ in found[table]}
        missing = [f"NULL::{data_type} AS {column}" for column, data_type in columns if column not in have]
        if missing:
            con.execute(f"CREATE TEMP VIEW {table} AS SELECT *, {', '.join(missing)} FROM store.main.{table}")
            views.append(table)
    return views


def _column_difference(found: list[tuple[str, str]], expected: list[tuple[str, str]]) -> str:
    """The first difference between a table's columns and the store table's; "" where there is none."""
    for i, (have, want) in enumerate(zip_longest(found, expected), 1):
        if have != want:
            if want is None:
                return f"it has a column {i}, {' '.join(have)}, the store's has {len(expected)}"
            if have is None:
                return f"it lacks column {i}, {' '.join(want)}"
            return f"its column {i} is {' '.join(have)}, not {' '.join(want)}"
    return ""


@contextmanager
def store_for_planning(con: duckdb.DuckDBPyConnection, store: Path, wait: float,
                        shared: bool = False) -> Iterator[None]:
    """The store read-only, or an empty in-memory one where it has no tables yet (a
    first run, or a first run killed before its COMMIT).
    ``shared``: the store is the catalog's database, which has tables of its own."""
    exists = False
    if store.exists():
        attach(con, store, read_only=True, wait=wait)
        try:
            exists = has_store_tables(con, store)
            if not exists and not shared and con.execute(
                    "SELECT count(*) FROM duckdb_tables() WHERE database_name = 'store'").fetchone()[0]:
                # a run never writes into an unrelated database
                raise RescoreError(f"{store}: the store has tables but no rescore tables: it is not a rescore "
                                   "store (a database's own tables may share it with the store only when the "
                                   "catalog is one of them: --catalog FILE.duckdb:TABLE --store FILE.duckdb)")
        except RescoreError:
            detach(con)
            raise
        if not exists:
            detach(con)
    if not exists:
        con.execute("ATTACH ':memory:' AS store")
        con.execute("USE store")
        run_section(con, "schema")
    views = upgrade_views(con) if exists else []
    try:
        yield
    finally:
        for view in views:
            con.execute(f"DROP VIEW temp.main.{view}")
        detach(con)
