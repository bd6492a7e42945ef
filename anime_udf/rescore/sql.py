"""The SQL layer both engines run: sql/rescore.sql, section by section, and the variables
and queries around it.

The file defines the rescoring (the input hash, the plan, the checks, the counts, the
transaction, the run record); an engine sets the run's variables, runs the sections in
order and does the ``score`` step its own way (DuckDB: chunks in this process; Spark: the
SQL function's UDF on the executors). A guard in the file fails with ``error('rescore:
…')``, and ``guard_words`` is what the user is told.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Sequence

import duckdb

from anime_udf.rescore.bundles import ModelChoice
from anime_udf.rescore.run import RescoreError, Run
from anime_udf.sqlutil import sql_path

SQL_FILE = "rescore.sql"
# The version of the store's tables, as sql/rescore.sql writes it into rescore_meta (the file
# is its one source: a hand-run script and both engines write the same).
_SQL_TEXT = sql_path(SQL_FILE).read_text()
SCHEMA_VERSION = re.search(r"\('schema_version', '([^']+)'\)", _SQL_TEXT).group(1)
# Earlier versions the file upgrades in place: their tables lack the columns its schema section's
# ALTER statements add (ADDED_COLUMNS, by table), which hold NULL in the rows they had, and
# their rows' input hashes are v1 hashes, which a run carries over (rescore_v1_hashed).
UPGRADES = ("1", "2")
ADDED_COLUMNS: dict[str, list[str]] = {}
for _table, _column in re.findall(r"ALTER TABLE (\w+) ADD COLUMN IF NOT EXISTS (\w+)", _SQL_TEXT):
    ADDED_COLUMNS.setdefault(_table, []).append(_column)
# Every DuckDB connection of a run turns this off: DuckDB's progress bar, shown for a query over
# 2 s, prints to stdout, into --json (and, from a Spark worker, into the driver's output).
NO_PROGRESS_BAR = "SET enable_progress_bar = false"
# A run may remove at most this share of the keys the store holds (of any kind: a
# removed key loses every kind's rows) without --allow-shrink: a truncated or
# header-only catalog is far likelier than a catalog that really lost most of its rows.
SHRINK_LIMIT = 0.5


@lru_cache(maxsize=1)
def sql_sections() -> dict[str, str]:
    """The sections of sql/rescore.sql, by name (``-- @section NAME`` lines); read once."""
    sections: dict[str, str] = {}
    name = None
    for line in _SQL_TEXT.splitlines():
        match = re.fullmatch(r"--\s*@section\s+(\w+)\s*", line)
        if match:
            name = match.group(1)
            sections[name] = ""
        elif name is not None:
            sections[name] += line + "\n"
    return sections


def run_section(con: duckdb.DuckDBPyConnection, section: str) -> None:
    con.execute(sql_sections()[section])


def set_variable(con: duckdb.DuckDBPyConnection, name: str, value: Any, cast: str = "") -> None:
    con.execute(f"SET VARIABLE {name} = ?{cast}", [value])


def start(con: duckdb.DuckDBPyConnection, run: Run, choices: Sequence[ModelChoice]) -> None:
    """The run's variables, its ``start`` section, and the chosen models into rescore_models
    (the ``model`` section, once each)."""
    set_variable(con, "rescore_run_id", run.id)
    set_variable(con, "rescore_started_at", run.started.isoformat(), "::TIMESTAMPTZ")
    set_variable(con, "rescore_key_column", run.key)
    set_variable(con, "rescore_catalog", run.catalog)
    set_variable(con, "rescore_level", run.level, "::DOUBLE")
    run_section(con, "start")
    for choice in choices:
        set_variable(con, "rescore_model_id", choice.model_id)
        set_variable(con, "rescore_model_kind", choice.kind)
        set_variable(con, "rescore_bundle", str(choice.path))
        set_variable(con, "rescore_alias", choice.alias)
        run_section(con, "model")


def guard_words(exc: duckdb.Error) -> str:
    """A DuckDB error as the user is told it: a guard of sql/rescore.sql in its own words."""
    message = str(exc)
    return message.split("rescore: ", 1)[1] if "rescore: " in message else message


def check_schema_version(found: Any) -> None:
    """The store's tables must be of the schema this anime-udf writes, or of one it upgrades
    (``found``: what its rescore_meta says; None before its first run)."""
    if found is not None and found != SCHEMA_VERSION and found not in UPGRADES:
        raise RescoreError(f"the store has rescore schema version {found}; this anime-udf writes "
                           f"version {SCHEMA_VERSION} and upgrades version {', '.join(UPGRADES)}")


def catalog_fingerprint(con: duckdb.DuckDBPyConnection) -> str:
    return con.execute("SELECT getvariable('rescore_catalog_fingerprint')").fetchone()[0]


def run_records(con: duckdb.DuckDBPyConnection, run_id: str) -> list[dict[str, Any]]:
    """The run's rows of rescore_runs, one per model, without what the run record says once."""
    return con.sql("SELECT * EXCLUDE (catalog, key_column, run_id) FROM rescore_runs WHERE run_id = ? "
                   "ORDER BY model_kind", params=[run_id]).pl().to_dicts()


def refuse_shrink(con: duckdb.DuckDBPyConnection, run: Run) -> None:
    """Refuse a run that would remove more than SHRINK_LIMIT of the keys the store holds,
    of any kind: a key gone from the catalog loses its rows of every kind, the kinds
    this run does not score included."""
    held, gone = con.execute(
        "SELECT count(*), count(*) FILTER (key NOT IN (SELECT key FROM rescore_input)) FROM "
        "(SELECT DISTINCT key FROM rescore_scores)"
    ).fetchone()
    if gone > held * SHRINK_LIMIT:
        raise RescoreError(
            f"{run.catalog} would remove {gone} of the {held} keys {run.store} holds (more than {SHRINK_LIMIT:.0%}); "
            "is the catalog complete? Pass --allow-shrink to remove them")
