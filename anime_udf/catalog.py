"""Reading and validating catalogs: the one place where outside data enters.

A catalog is CSV, Parquet, a table of a DuckDB database file (``FILE.duckdb:TABLE``),
a Polars/Arrow table or a DuckDB relation with the model inputs ``synopsis, genres,
studio, episodes`` and, for training or evaluation, ``score``. Other columns are kept
as they are (a key such as ``anime_id``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa

from anime_udf.columns import EPISODES, GENRES, INPUT_COLUMNS, SCORE_COLUMN, STUDIO, SYNOPSIS
from anime_udf.errors import AnimeUdfError
from anime_udf.sqlutil import quote_ident

if TYPE_CHECKING:
    import duckdb

SCORE_RANGE = (1.0, 10.0)
# A catalog path with one of these suffixes is a DuckDB database: FILE.duckdb:TABLE names its table.
DATABASE_SUFFIXES = (".duckdb", ".ddb", ".db")
CSV_SEPARATORS = {".csv": ",", ".tsv": "\t", ".txt": ","}


class CatalogError(AnimeUdfError, ValueError):
    """A catalog cannot be read or has a bad column or value."""


@dataclass(frozen=True)
class DatabaseTable:
    """A table (or view) of a DuckDB database file, written ``FILE.duckdb:TABLE`` or
    ``FILE.duckdb:SCHEMA.TABLE`` wherever a catalog goes."""

    database: Path
    table: str

    def __str__(self) -> str:
        return f"{self.database}:{self.table}"

    @property
    def name(self) -> str:
        """The last part of the name, as Path.name (report titles)."""
        return f"{self.database.name}:{self.table}"


def catalog_source(value: str | Path | DatabaseTable) -> Path | DatabaseTable:
    """A catalog argument as a file path or a database table: the one parser of ``FILE.duckdb:TABLE``.

    The text after the last ``:`` names the table when the text before it ends in a DuckDB
    suffix (.duckdb, .ddb, .db) and the whole text is no existing file (``snap.db:1/catalog.csv``
    is a file in a directory ``snap.db:1``); anything else is a file path, colons included."""
    if isinstance(value, DatabaseTable):
        return value
    text = str(value)
    if Path(text).exists():
        return Path(text)
    # Each colon after a DuckDB suffix may end the database's path (a table name may hold colons,
    # a folder name too): an existing database file decides, else the last such colon.
    splits = [(Path(text[:i]), text[i + 1:]) for i, char in enumerate(text)
              if char == ":" and Path(text[:i]).suffix.lower() in DATABASE_SUFFIXES]
    if not splits:
        return Path(text)
    database, table = next(((d, t) for d, t in splits if d.is_file()), splits[-1])
    if not table:
        raise CatalogError(f"{text}: name the table after the colon, e.g. {database}:anime")
    return DatabaseTable(database, table)


def duckdb_path(path: Path) -> str:
    """A database file's path as DuckDB must be given it: absolute, since DuckDB reads the first
    part of a relative path with a colon (``snap:1/w.duckdb``) as an extension's prefix."""
    return str(path.absolute())


def is_duckdb_file(path: Path) -> bool:
    """Whether ``path`` holds a DuckDB database (DuckDB's magic bytes at offset 8 of its header)."""
    with open(path, "rb") as fh:
        return fh.read(12)[8:12] == b"DUCK"


def read_table(ref: DatabaseTable) -> pl.DataFrame:
    """All rows of a database table, read through a read-only connection that is closed again."""
    import duckdb

    if not ref.database.is_file():
        raise CatalogError(f"{ref.database}: no such database file")
    try:
        con = duckdb.connect(duckdb_path(ref.database), read_only=True)
    except duckdb.Error as exc:  # not a DuckDB file, or open for writing in another process
        raise CatalogError(f"{ref.database}: cannot open the database: {exc}") from exc
    try:
        tables = con.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_catalog = current_database() ORDER BY ALL").fetchall()

        def label(schema: str, name: str) -> str:  # as the error lists it; a name may hold dots
            return name if schema == "main" else f"{schema}.{name}"

        wanted = ref.table.lower()
        quoted = quoted_table_name(ref.table)
        found = [(s, n) for s, n in tables if wanted in (label(s, n).lower(), f"{s}.{n}".lower())
                 or quoted in ((None, n.lower()), (s.lower(), n.lower()))]
        if not found:
            names = ", ".join(label(s, n) for s, n in tables) or "none"
            raise CatalogError(f"{ref}: the database has no table {ref.table!r} (its tables: {names})")
        # A name both ways (table "dot.ted" of main, table "ted" of schema dot): main's, as listed.
        schema, name = min(found, key=lambda t: t[0] != "main")
        return con.sql(f"SELECT * FROM {quote_ident(schema)}.{quote_ident(name)}").pl()
    finally:
        con.close()


def quoted_table_name(text: str) -> tuple[str | None, str] | None:
    """``"t.y"`` or ``"s.x"."t.y"`` (SQL's quoted identifiers, ``""`` a quote) as (schema or None,
    table), lower case as DuckDB compares names; None for a name that is not quoted so."""
    part = r'"((?:[^"]|"")*)"'
    match = re.fullmatch(rf"{part}(?:\.{part})?", text.strip())
    if not match:
        return None
    first, second = (None if p is None else p.replace('""', '"').lower() for p in match.groups())
    return (first, second) if second is not None else (None, first)


def catalog_label(source: Any) -> str:
    """How messages name a catalog: its path or table, else its type (a data frame)."""
    return str(source) if isinstance(source, (str, Path, DatabaseTable)) else type(source).__name__


def read_catalog(source: Any, *, require_score: bool = False, allow_missing_scores: bool = False,
                 name: str | None = None) -> pl.DataFrame:
    """Read ``source`` and return it with the input columns in canonical types.

    ``synopsis``, ``genres`` and ``studio`` become strings, ``episodes`` an integer
    (NULL when missing), ``score`` a float. Errors name the column and the value.
    ``require_score`` checks every score is in range; ``allow_missing_scores`` lets
    NULL scores through (evaluation skips and counts them).
    """
    label = name or catalog_label(source)
    return canonical_columns(_to_polars(source, label), label, require_score, allow_missing_scores)


def add_catalog(con: duckdb.DuckDBPyConnection, source: Any, **checks: bool) -> None:
    """Read a catalog (validated; ``checks`` as for read_catalog) into the DuckDB connection ``con``
    as the view ``catalog``, then shut ``con`` off from files: a condition the user gives (``--where``)
    filters the catalog and reads nothing else."""
    con.register("catalog", read_catalog(source, **checks))
    con.execute("SET enable_external_access = false")


def read_catalog_as_read(source: Any, *, name: str | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(the catalog as read, its model inputs in canonical types), row for row.

    The first is what a user gets back where a command writes their catalog out again
    (``score``, ``sql --table``): every column with its own values and type (a DOUBLE
    ``episodes`` of 1e30 or NaN, a LIST ``genres``), checked as ``read_catalog`` checks it.
    A CSV file has no types: its columns are typed as a CSV reader infers them."""
    label = name or catalog_label(source)
    df = _to_polars(source, label)
    inputs = canonical_columns(df, label).select(INPUT_COLUMNS)
    path = catalog_source(source) if isinstance(source, (str, Path)) else None
    if isinstance(path, Path) and path.suffix.lower() in CSV_SEPARATORS:  # read once more, every column typed
        try:
            df = _read_csv(path, text_columns=())
        except Exception as exc:
            raise CatalogError(f"{label}: cannot read: {exc}") from exc
    return df, inputs


def canonical_columns(df: pl.DataFrame, label: str, require_score: bool = False,
                      allow_missing_scores: bool = False) -> pl.DataFrame:
    """``df`` with its input columns (and ``score``) in canonical types, checked (read_catalog)."""
    missing = [c for c in INPUT_COLUMNS if c not in df.columns]
    if require_score and SCORE_COLUMN not in df.columns:
        missing.append(SCORE_COLUMN)
    if missing:
        raise CatalogError(
            f"{label}: missing column(s) {', '.join(missing)} (it has: {', '.join(df.columns) or 'none'})"
        )
    casts = [_to_text(df, c, label) for c in (SYNOPSIS, GENRES, STUDIO)]
    casts.append(_to_number(df, EPISODES, label, pl.Int64))
    if SCORE_COLUMN in df.columns:
        casts.append(_to_number(df, SCORE_COLUMN, label, pl.Float64))
    df = df.with_columns(casts)
    if require_score:
        _check_scores(df, label, allow_missing_scores)
    return df


def _to_polars(source: Any, label: str) -> pl.DataFrame:
    if isinstance(source, pl.DataFrame):
        return source
    if isinstance(source, (pa.Table, pa.RecordBatch)):
        return pl.from_arrow(source)
    if hasattr(source, "pl") and callable(source.pl):  # a DuckDB relation
        return source.pl()
    if not isinstance(source, (str, Path, DatabaseTable)):
        raise CatalogError(f"cannot read a catalog from {type(source).__name__}")
    path = catalog_source(source)
    if isinstance(path, DatabaseTable):
        return read_table(path)
    if path.suffix.lower() in DATABASE_SUFFIXES:
        raise CatalogError(f"{label}: a DuckDB database; name its table: {path}:TABLE")
    if not path.exists():
        raise CatalogError(f"{label}: no such file")
    suffix = path.suffix.lower()
    try:
        # Opened by us, so that a name with * [ ] ? is one file, never a glob pattern.
        if suffix in (".parquet", ".pq"):
            with open(path, "rb") as fh:
                return pl.read_parquet(fh)
        if suffix in CSV_SEPARATORS:
            return _read_csv(path)
    except Exception as exc:  # polars raises several unrelated types for bad files
        raise CatalogError(f"{label}: cannot read: {exc}") from exc
    raise CatalogError(f"{label}: unsupported file type {suffix!r} (use .csv or .parquet)")


def _read_csv(path: Path, text_columns: tuple[str, ...] = (*INPUT_COLUMNS, SCORE_COLUMN)) -> pl.DataFrame:
    """A CSV file, opened by us so that a name with * [ ] ? is one file, never a glob pattern. The
    model columns are read as text, so that a bad value can be reported by name; without
    ``text_columns`` every column is typed from all its values (the catalog as read)."""
    with open(path, "rb") as fh:
        return pl.read_csv(fh, schema_overrides={c: pl.String for c in text_columns},
                           infer_schema_length=10_000 if text_columns else None,
                           separator=CSV_SEPARATORS[path.suffix.lower()])


def _to_text(df: pl.DataFrame, column: str, label: str) -> pl.Expr:
    """A text column as strings. A list of names (genres stored as LIST) becomes the comma-separated
    string the models read; other nested values are an error naming the column and its type."""
    dtype = df.schema[column]
    if isinstance(dtype, (pl.List, pl.Array)) and dtype.inner in (pl.String, pl.Categorical, pl.Null):
        return pl.col(column).cast(pl.List(pl.String)).list.join(",").alias(column)
    if dtype.is_nested() or dtype == pl.Binary or dtype == pl.Object:
        raise CatalogError(f"{label}: column {column!r} is {dtype}; expected text"
                           + (" (or a list of names)" if column == GENRES else ""))
    return pl.col(column).cast(pl.String)


def _to_number(df: pl.DataFrame, column: str, label: str, dtype: type[pl.DataType]) -> pl.Expr:
    """Cast ``column`` to ``dtype``; empty strings are NULL, anything else unparseable is an error."""
    col = df.get_column(column)
    if col.dtype == pl.Boolean or col.dtype.is_nested():
        raise CatalogError(f"{label}: column {column!r} is {col.dtype}; expected numbers")
    if col.dtype == pl.String:
        col = col.str.strip_chars().replace("", None)
    as_float = col.cast(pl.Float64, strict=False)
    bad = col.is_not_null() & as_float.is_null()
    if bad.any():
        row = int(bad.arg_true()[0])
        kind = "an integer" if dtype == pl.Int64 else "a number"
        raise CatalogError(f"{label}: column {column!r} row {row + 1}: {col[row]!r} is not {kind}")
    if dtype == pl.Int64:
        # The models' rule (features.log_episodes): NaN, ±inf and fractions are missing; huge counts
        # are capped.
        values = pl.Series(column, as_float).fill_nan(None)
        values = values.set(pl.Series(not_whole(values.fill_null(0).to_numpy())), None)
        values = pl.select(pl.when(values.is_infinite()).then(None).otherwise(values.clip(-2.0**62, 2.0**62))
                           ).to_series()
        return pl.lit(values.cast(pl.Int64)).alias(column)
    return pl.lit(pl.Series(column, as_float)).alias(column)


def not_whole(values: np.ndarray | float) -> np.ndarray:
    """An episode count that is no count: a finite value with a fraction (2.5). A missing value
    wherever inputs enter, as NaN, ±inf and negative counts are (the reader makes it NULL,
    features.log_episodes reads it as missing): one dirty row never fails a query or a file."""
    values = np.asarray(values, dtype=np.float64)
    return np.isfinite(values) & (values != np.round(values))


def _check_scores(df: pl.DataFrame, label: str, allow_missing: bool) -> None:
    scores = df.get_column(SCORE_COLUMN)
    lo, hi = SCORE_RANGE
    bad = scores.is_nan() | (scores < lo) | (scores > hi)
    if not allow_missing:
        bad = bad | scores.is_null()
    if bad.any():
        row = int(bad.arg_true()[0])
        raise CatalogError(
            f"{label}: column 'score' row {row + 1}: {scores[row]!r} is not a score in [{lo:g}, {hi:g}]"
        )


def fingerprint(df: pl.DataFrame) -> str:
    """Fingerprint of a training catalog's model inputs and scores (NULLs included, row order
    counts), recorded in bundles and compared by a resumed fine-tuning run. Not the rescoring's
    input hash: that is sql/rescore.sql's ``rescore_input_hash``, which hashes the inputs as the
    models see them."""
    digest = hashlib.sha256()
    columns = [c for c in (*INPUT_COLUMNS, SCORE_COLUMN) if c in df.columns]
    for row in df.select(columns).iter_rows():
        inputs = json.dumps(list(row[:4]), ensure_ascii=False, separators=(",", ":"))
        digest.update(hashlib.sha256(inputs.encode("utf-8")).hexdigest().encode())
        if len(row) > 4:
            digest.update(repr(row[4]).encode())
    return "sha256:" + digest.hexdigest()[:16]
