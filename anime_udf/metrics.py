"""Evaluation metrics, computed by the SQL in sql/metrics.sql (never by Python loops).

On the base floor (DESIGN.md, "Layers"): light to import, DuckDB, numpy and polars are
imported by the functions that compute."""

from __future__ import annotations

from typing import TYPE_CHECKING

from anime_udf.sqlutil import sql_path

if TYPE_CHECKING:
    import duckdb
    import numpy as np
    import polars as pl

METRIC_COLUMNS = ("n", "mae", "rmse", "spearman", "r2")
INTERVAL_COLUMNS = ("n", "coverage", "mean_width", "interval_score")


def metric_macros() -> str:
    """sql/metrics.sql: the metric macros (TEMP, so each connection or cursor runs them)."""
    return sql_path("metrics.sql").read_text()


def load_metric_macros(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(metric_macros())


def metrics_table(con: duckdb.DuckDBPyConnection, table: str) -> pl.DataFrame:
    """One row per model: n, MAE, RMSE, Spearman, R², from a table (model, y, yhat)."""
    load_metric_macros(con)
    return con.sql("SELECT * FROM regression_metrics($tbl)", params={"tbl": table}).pl()


def interval_metrics_table(con: duckdb.DuckDBPyConnection, table: str, level: float) -> pl.DataFrame:
    """One row per model: n, coverage, mean width, interval score at ``level``, from a table
    (model, y, lo, hi)."""
    load_metric_macros(con)
    return con.sql("SELECT * FROM interval_metrics($tbl, $level)", params={"tbl": table, "level": level}).pl()


def compute_metrics(y: np.ndarray, yhat: np.ndarray) -> dict[str, float]:
    """The same SQL metrics for in-memory arrays (used while training)."""
    import duckdb
    import numpy as np
    import polars as pl

    con = duckdb.connect()
    try:
        pairs = pl.DataFrame({"model": "m", "y": np.asarray(y, float), "yhat": np.asarray(yhat, float)})
        con.register("pairs", pairs)
        row = metrics_table(con, "pairs").row(0, named=True)
    finally:
        con.close()
    # Undefined figures (Spearman of constant predictions) are None: bundles hold strict JSON.
    return {k: (int(row[k]) if k == "n" else None if row[k] is None or not np.isfinite(row[k]) else float(row[k]))
            for k in METRIC_COLUMNS}
