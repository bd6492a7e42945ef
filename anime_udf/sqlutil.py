"""The project's SQL files (sql/) and quoting of the SQL we build from user input."""

from __future__ import annotations

from pathlib import Path


def sql_path(name: str) -> Path:
    """A file of the project's sql/ directory: inside the installed package, or beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "sql" / name, here.parent / "sql" / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"sql/{name} is missing from the anime-udf installation")


def quote_ident(name: str) -> str:
    """A SQL identifier, double-quoted: safe for any column or table name."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str | Path) -> str:
    """A SQL string literal, single-quoted."""
    return "'" + str(value).replace("'", "''") + "'"
