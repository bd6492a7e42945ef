"""The project's SQL files (sql/), and quoting and checking of the SQL we build from user input."""

from __future__ import annotations

from pathlib import Path

from anime_udf.errors import AnimeUdfError


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


class NotOneExpressionError(AnimeUdfError, ValueError):
    """A filter given as SQL (``eval --where``, ``train --valid-where``) that is not one expression."""


def one_expression(text: str) -> str:
    """``text`` as exactly one SQL expression, parenthesised, as DuckDB's parser renders it back: no
    second statement, set operation or comment can ride along into the query it is put in."""
    import duckdb

    try:
        return f"({duckdb.SQLExpression(text)})"
    except duckdb.Error as exc:
        raise NotOneExpressionError(f"{text!r} is not one SQL expression: {exc}") from None
