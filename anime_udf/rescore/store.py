"""The store and its lock.

Both engines take the lock: ``STORE.lock``, an exclusive ``flock`` the kernel releases when
its holder exits or is killed, so it is never stale. The DuckDB store is a database file
(its own, or the catalog's warehouse), attached only to plan (read-only) and to apply, so
that readers can open it while the slow scoring runs. The Spark store is a directory of
snapshots (anime_udf/rescore/on_spark.py).
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import duckdb

from anime_udf.catalog import DatabaseTable
from anime_udf.rescore.run import RescoreError, StoreBusyError, now
from anime_udf.rescore.sql import check_schema_version, run_section
from anime_udf.sqlutil import quote_literal


def lock_path(store: Path) -> Path:
    return store.with_name(store.name + ".lock")


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


def attach(con: duckdb.DuckDBPyConnection, store: Path, *, read_only: bool, wait: float) -> None:
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


def detach(con: duckdb.DuckDBPyConnection) -> None:
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
    check_schema_version(row and row[0])
    return True


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
            exists = _has_tables(con, shared)
        except RescoreError as exc:
            detach(con)
            raise RescoreError(f"{store}: {exc}") from exc
        if not exists:
            detach(con)
    if not exists:
        con.execute("ATTACH ':memory:' AS store")
        con.execute("USE store")
        run_section(con, "schema")
    try:
        yield
    finally:
        detach(con)
