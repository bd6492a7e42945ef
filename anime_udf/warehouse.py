"""What `anime-udf sql` does: a query or script run with the scoring functions and the report
macros, in memory or in a DuckDB database (``--db``, read-only unless ``--write``), its result
printed or written to a file.

The promises of ``--db`` are kept here, before anything runs: a script works in that database
and writes nothing else, and a ``--write`` script is one transaction, saved with its ``--out``
file or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import duckdb

from anime_udf.catalog import DatabaseTable, is_duckdb_file, read_catalog_as_read
from anime_udf.errors import AnimeUdfError, OptionError
from anime_udf.evaluation import load_report_macros
from anime_udf.files import check_out_suffix, write_result
from anime_udf.registry import no_bundle_message
from anime_udf.udf import FUNCTION_NAMES, LazyScorer, NoModelsError, connect

if TYPE_CHECKING:
    import polars as pl


class WarehouseError(AnimeUdfError):
    """A query that its database refuses as it was opened: a change to a read-only ``--db``."""


def run_sql(query: str, *, views: Sequence[tuple[str, Path | DatabaseTable]] = (), database: Path | None = None,
            write: bool = False, out: Path | None = None, model_paths: Sequence[str] = (),
            models_dir: Path | str | None = None, device: str = "auto", precision: str = "auto"
            ) -> pl.DataFrame | None:
    """Run ``query`` (a script: its last statement's result is returned, None where it has none)
    with ``views`` ({NAME: catalog}) and, with ``out``, write the result there. Everything that can
    be refused is refused before any bundle loads."""
    if out:
        check_out_suffix(out)
    check_database(database, write)
    if database:
        check_statements(query, write)
    # Read before the --db database is opened: a --table of that database reads it through a
    # read-only connection of its own, which DuckDB refuses beside a --write one. The views are
    # the catalogs as read (checked, never rewritten): a query's result holds the user's values.
    frames = [(name, read_catalog_as_read(path)[0]) for name, path in views]
    con, scorers = connect(models_dir, model_paths, device, precision, require_models=False, database=database,
                           read_only=not write)
    with con:  # closed at the end: a --db database is free for the next process (or the next command)
        load_report_macros(con)
        for name, df in frames:
            con.register(name, df)
        if write:  # one transaction: committed once the whole script has run, else rolled back on close
            con.begin()
        result = run_query(con, query, scorers, models_dir)
        df = result.pl() if result is not None else None  # a last SELECT runs here, inside the transaction
        commit = con.commit if write else None
        if out and df is not None:
            write_result(df, out, before_replace=commit)  # nothing is saved when --out cannot be written
        elif commit:
            commit()
    return df


def format_result(df: pl.DataFrame, limit: int) -> str:
    """A result's first ``limit`` rows, as sql prints them."""
    import polars as pl

    with pl.Config(tbl_rows=limit, fmt_str_lengths=40, tbl_width_chars=160):
        return str(df.head(limit))


def run_query(con: duckdb.DuckDBPyConnection, query: str, scorers: dict[str, LazyScorer],
              models_dir: Path | str | None):
    """``con.sql(query)``; a call of a scoring function with no bundle says which bundle is missing."""
    try:
        return con.sql(query)
    except duckdb.InvalidInputException as exc:
        if "read-only mode" in str(exc):
            raise WarehouseError(f"{exc}; pass --write to change the --db database") from None
        raise
    except duckdb.CatalogException as exc:
        for kind, name in FUNCTION_NAMES.items():
            if name not in scorers and f"name {name} does not exist" in str(exc):
                raise NoModelsError(f"{name}: {no_bundle_message(models_dir, kind)} or --model BUNDLE") from None
        raise


def check_database(database: Path | None, write: bool) -> None:
    """sql's --db: an existing DuckDB file, or with --write a new one."""
    if write and not database:
        raise OptionError("--write opens the --db database for writing: pass --db FILE.duckdb", "--write")
    if database and not write and not database.is_file():
        raise OptionError(f"{database}: no such database file (--write creates one)", "--db")
    # DuckDB opens some other files (a .csv) as an empty in-memory database and saves nothing.
    if database and database.exists() and not is_duckdb_file(database):
        raise OptionError(f"{database}: not a DuckDB database file", "--db")


def check_statements(query: str, write: bool) -> None:
    """Refuse, before anything runs, the statements that would break a --db promise. The script
    works in the --db database and writes nothing else: ATTACH and DETACH (through them a script
    can reopen a read-only file for writing, or create another), INSTALL (a download), EXPORT
    DATABASE and COPY ... TO (files that a failed --write script could not take back; a result is
    exported with --out) are refused; without --write, every COPY (COPY ... FROM fills a table);
    with --write, BEGIN / COMMIT / ROLLBACK (the script is one transaction of its own)."""
    kinds = duckdb.StatementType
    for statement in duckdb.extract_statements(query):
        text = statement.query.strip().rstrip(";")
        first_word = text.split(None, 1)[0].upper() if text else ""
        if write and statement.type == kinds.TRANSACTION:
            reason = "a --write script runs as one transaction, all or nothing; leave out BEGIN, COMMIT and ROLLBACK"
        elif statement.type in (kinds.ATTACH, kinds.DETACH):
            reason = ("sql works in the --db database only: read another database with --table NAME=FILE.duckdb:TABLE"
                      + ("" if write else "; --db is read-only, and attaching could reopen it for writing"))
        elif statement.type == kinds.LOAD and first_word in ("INSTALL", "FORCE"):
            reason = "installing an extension downloads it; sql installs nothing"
        elif statement.type == kinds.EXPORT or (statement.type == kinds.COPY and (not write or copies_to_file(text))):
            reason = ("sql writes files only through --out: export a result with --out FILE" + (
                "" if write else "; --db is read-only (pass --write to fill a table with COPY ... FROM)"))
        else:
            continue
        raise OptionError(f"{text}: {reason}", "QUERY")


def copies_to_file(copy_statement: str) -> bool:
    """Whether a COPY statement writes a file: a TO outside its parentheses (its query's own words)."""
    tokens = duckdb.tokenize(copy_statement)
    depth = 0
    for (start, kind), (end, _) in zip(tokens, [*tokens[1:], (len(copy_statement), None)]):
        word = copy_statement[start:end].strip()
        depth += word.count("(") - word.count(")") if kind == duckdb.token_type.operator else 0
        if depth == 0 and kind == duckdb.token_type.keyword and word.upper() == "TO":
            return True
    return False
