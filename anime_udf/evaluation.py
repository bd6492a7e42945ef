"""What `anime-udf eval` measures: the predictions table every figure is computed from, in SQL;
and what `anime-udf explain` shows, the parts of the scores of chosen rows.

``predictions`` holds one row per (model, evaluated catalog row) with the columns the macros
of sql/report.sql read; the view ``evaluated`` adds the reference every model must beat, a
constant prediction of the training mean recorded in its bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import duckdb
import polars as pl

from anime_udf.catalog import DatabaseTable, add_catalog
from anime_udf.columns import DEFAULT_KEY
from anime_udf.errors import AnimeUdfError
from anime_udf.explain import fields, has_references
from anime_udf.files import check_out_suffix, write_result
from anime_udf.metrics import interval_metrics_table, load_metric_macros, metrics_table
from anime_udf.sqlutil import quote_ident, quote_literal, sql_path
from anime_udf.udf import EXPLAIN_NAMES, INTERVAL_NAMES, connect

PREDICTIONS = "predictions"
EVALUATED = "evaluated"
EXPLANATIONS = "explanations"
INTERVALS = "intervals"
RELIABILITY = "interval_levels"  # the report's intervals at each of RELIABILITY_LEVELS
RELIABILITY_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
REPORT_LEVEL = 0.9  # the level of the report's interval figures when eval has no --level
REFERENCE = "training mean"
CONSTANT_WIDTH = "constant width"  # each model's interval reference: its score ± one width, same calibration rows


class NothingToEvaluateError(AnimeUdfError):
    """The selection holds no row (to evaluate: none with a score)."""


@dataclass(frozen=True)
class Evaluation:
    models: tuple[str, ...]  # labels in the predictions table, one per scorer (its kind)
    references: dict[str, float]  # label in `evaluated` -> the constant it predicts
    bundles: dict[str, str]  # model label -> bundle name
    catalog_rows: int
    selected_rows: int
    skipped_rows: int  # selected rows without a score: left out of every figure
    key: str  # what the key column holds: the catalog's anime_id, or the row number
    statements: tuple[str, ...]  # the SQL that built `predictions` and `evaluated`, shown in the report
    # Bundles that cannot explain their scores (trained before references were stored): with none,
    # `explanations` holds each model's parts of every evaluated row (when asked for).
    unexplained: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReportIntervals:
    """What the report shows of the prediction intervals: ``intervals`` at ``level`` and
    ``RELIABILITY`` were built by ``statements``; with ``uncalibrated`` bundles, neither."""

    level: float
    statements: tuple[str, ...]
    uncalibrated: tuple[str, ...] = ()


def load_report_macros(con: duckdb.DuckDBPyConnection) -> None:
    """The metric macros, then the grouped queries of sql/report.sql that use them."""
    load_metric_macros(con)
    con.execute(sql_path("report.sql").read_text())


def explanations_sql(scorers: dict[str, Any], source: str, keep: list[str]) -> str:
    """A query of the parts of each of ``scorers``' ({SQL function name: scorer}) scores for the
    rows of ``source``: one row per (model, row), the columns ``keep`` of ``source`` and the
    fields of the explaining functions (``lexical`` NULL for a baseline, when a fusion is there)."""
    kinds = [scorer.kind for scorer in scorers.values()]
    columns = fields("fusion" if "fusion" in kinds else "baseline")
    kept = ", ".join(keep)
    return "\nUNION ALL\n".join(
        f"SELECT {quote_literal(kind)} AS model, {kept}, "
        + ", ".join(f"e.{c}" if c in fields(kind) else f"NULL::DOUBLE AS {c}" for c in columns)
        + f"\nFROM (SELECT {kept}, {EXPLAIN_NAMES[kind]}(synopsis, genres, studio, episodes) AS e FROM {source})"
        for kind in kinds)


def build_predictions(con: duckdb.DuckDBPyConnection, catalog: str, condition: str,
                      scorers: dict[str, Any], explain: bool = False) -> Evaluation:
    """Score the rows of view ``catalog`` that satisfy SQL ``condition`` and have a score, with each
    of ``scorers`` ({SQL function name: scorer}), into ``predictions``; create ``evaluated`` and,
    with ``explain`` (and bundles that can), ``explanations``.
    An empty selection, or one without scores, is an error rather than a table of NULLs."""
    source = quote_ident(catalog)
    columns = [row[0] for row in con.execute(f"DESCRIBE {source}").fetchall()]
    catalog_rows, selected_rows, scored_rows = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE {condition}), count(score) FILTER (WHERE {condition}) "
        f"FROM {source}").fetchall()[0]
    if selected_rows == 0:
        raise NothingToEvaluateError(f"nothing to evaluate: the selection holds none of the {catalog_rows} "
                                     "catalog rows (check --where)")
    if scored_rows == 0:
        raise NothingToEvaluateError(f"nothing to evaluate: none of the {selected_rows} selected rows has a score")

    has_key = DEFAULT_KEY in columns  # the catalog's key shows a row in the report, else its number
    key = quote_ident(DEFAULT_KEY) if has_key else "row_id"
    title = "title::VARCHAR" if "title" in columns else "NULL::VARCHAR"
    labels = {fn: scorer.kind for fn, scorer in scorers.items()}
    # row_id numbers the evaluated rows: it tells rows apart where keys repeat.
    statements = [
        f"CREATE OR REPLACE TEMP TABLE scored_rows AS\n"
        f"SELECT row_number() OVER () AS row_id, {key} AS key, {title} AS title, genres, studio, episodes,\n"
        f"       score AS y, synopsis\nFROM {source} WHERE {condition} AND score IS NOT NULL",
        f"CREATE OR REPLACE TEMP TABLE {PREDICTIONS} AS\n" + "\nUNION ALL\n".join(
            f"SELECT {quote_literal(label)} AS model, row_id, key, title, genres, studio, episodes, y,\n"
            f"       {fn}(synopsis, genres, studio, episodes) AS yhat FROM scored_rows"
            for fn, label in labels.items()),
    ]
    means = {scorer.kind: float(scorer.manifest["target"]["mean"]) for scorer in scorers.values()}
    if len(set(means.values())) == 1:
        references = {REFERENCE: next(iter(means.values()))}
    else:  # models trained on different data: each has its own reference
        references = {f"{REFERENCE} ({label})": mean for label, mean in means.items()}
    first = quote_literal(next(iter(labels.values())))
    statements.append(f"CREATE OR REPLACE TEMP VIEW {EVALUATED} AS\nSELECT * FROM {PREDICTIONS}" + "".join(
        f"\nUNION ALL\nSELECT {quote_literal(label)}, row_id, key, title, genres, studio, episodes, y, "
        f"{mean!r}::DOUBLE FROM {PREDICTIONS} WHERE model = {first}"
        for label, mean in references.items()))
    unexplained = tuple(scorer.name for scorer in scorers.values() if not has_references(scorer.manifest))
    if explain and not unexplained:
        statements.append(f"CREATE OR REPLACE TEMP TABLE {EXPLANATIONS} AS\n"
                          + explanations_sql(scorers, "scored_rows", ["row_id", "key", "title"]))
    for statement in statements:
        con.execute(statement)
    return Evaluation(
        models=tuple(labels.values()), references=references,
        bundles={scorer.kind: scorer.name for scorer in scorers.values()},
        catalog_rows=catalog_rows, selected_rows=selected_rows, skipped_rows=selected_rows - scored_rows,
        key=DEFAULT_KEY if has_key else "row", statements=tuple(statements), unexplained=unexplained)


def build_intervals(con: duckdb.DuckDBPyConnection, scorers: dict[str, Any], levels: Sequence[float],
                    table: str = INTERVALS) -> list[str]:
    """After ``build_predictions``: ``table`` (model, level, row_id, genres, episodes, y, yhat, lo, hi)
    of each model's interval at each of ``levels`` for every evaluated row, and beside each, its
    reference (``"KIND constant width"``): the score ± the width that covers the level of the same
    calibration rows' errors. Returns the statements run. A bundle without calibration: one clear error."""
    from anime_udf.intervals import check_levels

    check_levels(list(levels))
    asked = ", ".join(f"({level!r})" for level in levels)
    parts = []
    for scorer in scorers.values():
        kind = quote_literal(scorer.kind)
        calibration = scorer.calibration()
        halves = ", ".join(f"({level!r}, {calibration.constant_half_width(level)!r})" for level in levels)
        parts.append(f"SELECT p.model, s.level, p.row_id, p.genres, p.episodes, p.y, p.yhat, s.i.lo, s.i.hi FROM (\n"
                     f"  SELECT row_id, l.level, {INTERVAL_NAMES[scorer.kind]}(synopsis, genres, studio, episodes, "
                     f"l.level) AS i\n  FROM scored_rows, (VALUES {asked}) l(level)) s\n"
                     f"JOIN {PREDICTIONS} p USING (row_id) WHERE p.model = {kind}")
        parts.append(f"SELECT {quote_literal(f'{scorer.kind} {CONSTANT_WIDTH}')}, l.level, row_id, genres, episodes, "
                     f"y, yhat, greatest(1.0, yhat - l.half), least(10.0, yhat + l.half)\n"
                     f"FROM {PREDICTIONS}, (VALUES {halves}) l(level, half) WHERE model = {kind}")
    statements = [f"CREATE OR REPLACE TEMP TABLE {table} AS\n" + "\nUNION ALL\n".join(parts)]
    for statement in statements:
        con.execute(statement)
    return statements


def build_report_intervals(con: duckdb.DuckDBPyConnection, scorers: dict[str, Any], level: float | None,
                           built: Sequence[str] = ()) -> ReportIntervals:
    """The report's interval tables: ``intervals`` at ``level`` (or ``REPORT_LEVEL``; ``built``: the
    statements that already made it at ``level``) and ``RELIABILITY`` at ``RELIABILITY_LEVELS``;
    none where a bundle has no calibration (named in the result, for the report to say so)."""
    from anime_udf.intervals import has_calibration

    uncalibrated = tuple(scorer.name for scorer in scorers.values() if not has_calibration(scorer.manifest))
    if uncalibrated:
        return ReportIntervals(level or REPORT_LEVEL, (), uncalibrated)
    statements = list(built) if level is not None else build_intervals(con, scorers, [REPORT_LEVEL])
    statements += build_intervals(con, scorers, RELIABILITY_LEVELS, RELIABILITY)
    return ReportIntervals(level or REPORT_LEVEL, tuple(statements))


@dataclass(frozen=True)
class EvalResult:
    """What ``evaluate`` computed on ``con``: each model's metrics beside the reference's and, at
    ``level``, its intervals' figures; what eval prints (``screen``, ``json_rows``) and what its
    report reads (``report.write_eval_report``)."""

    con: duckdb.DuckDBPyConnection
    scorers: dict[str, Any]
    evaluation: Evaluation
    metrics: pl.DataFrame
    level: float | None = None
    intervals: pl.DataFrame | None = None
    interval_statements: tuple[str, ...] = ()  # what built the ``intervals`` table at ``level``

    @property
    def skipped(self) -> str:
        """The line saying how many selected rows had no score, or nothing."""
        n = self.evaluation.skipped_rows
        return f"skipped {n} selected row(s) without a score" if n else ""

    def json_rows(self) -> list[dict[str, Any]]:
        """eval --json: each model's metrics and, with a level, its interval figures and its reference's."""
        rows = self.metrics.filter(pl.col("model").is_in(self.evaluation.models)).to_dicts()
        if self.intervals is not None:
            by_model = {row.pop("model"): row for row in self.intervals.to_dicts()}
            for row in rows:
                row["interval"] = {"level": self.level, **without_n(by_model[row["model"]]),
                                   CONSTANT_WIDTH.replace(" ", "_"): without_n(
                                       by_model[f"{row['model']} {CONSTANT_WIDTH}"])}
        return rows

    def screen(self) -> str:
        """eval's tables and the lines that say what the references are."""
        with pl.Config(tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
            lines = [str(shown_table(self.metrics))]
            if self.intervals is not None:
                lines += [f"prediction intervals at level {self.level:g}:", str(shown_table(self.intervals))]
        means = ", ".join(f"{mean:.4f}" for mean in self.evaluation.references.values())
        lines.append(f"{REFERENCE}: every row predicted as the mean score of the training data ({means})")
        if self.intervals is not None:
            lines.append(f"{CONSTANT_WIDTH}: the model's score ± the one width that covers {self.level:g} of its "
                         "calibration rows (the adaptive interval must beat it)")
        if self.skipped:
            lines.append(self.skipped)
        return "\n".join(lines)


def without_n(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "n"}


def shown_table(table: pl.DataFrame) -> pl.DataFrame:
    """``table`` as text, figures to 4 decimals, an undefined one (the training mean's Spearman) a dash."""
    def shown(value) -> str:
        return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    return pl.DataFrame({c: [shown(v) for v in table[c]] for c in table.columns})


def evaluate(data: Path | DatabaseTable, condition: str = "true", *, model_paths: Sequence[str] = (),
             models_dir: Path | str | None = None, device: str = "auto", precision: str = "auto",
             level: float | None = None, explain: bool = False) -> EvalResult:
    """``anime-udf eval``: the catalog rows that satisfy SQL ``condition`` scored by the bundles
    ``model_paths`` names (``udf.chosen_bundles``), measured (sql/metrics.sql) and, with ``level``,
    their intervals too; with ``explain``, the parts of the scores for the report."""
    con, scorers = connect(models_dir, model_paths, device, precision)
    add_catalog(con, data, require_score=True, allow_missing_scores=True)
    evaluation = build_predictions(con, "catalog", condition, scorers, explain=explain)
    metrics = metrics_table(con, EVALUATED)
    if level is None:
        return EvalResult(con, scorers, evaluation, metrics)
    built = tuple(build_intervals(con, scorers, [level]))
    intervals = interval_metrics_table(con, INTERVALS, level)
    return EvalResult(con, scorers, evaluation, metrics, level, intervals, built)


def explain_rows(data: Path | DatabaseTable, condition: str = "true", *, model_paths: Sequence[str] = (),
                 models_dir: Path | str | None = None, device: str = "auto", precision: str = "auto",
                 out: Path | None = None) -> pl.DataFrame:
    """``anime-udf explain``: one row per (catalog row satisfying SQL ``condition``, model) with the
    row's number, its key and title where the catalog has them, and its score's parts; written to
    ``out`` (.parquet or .csv, its name checked before any work) where given."""
    if out:
        check_out_suffix(out)
    con, scorers = connect(models_dir, model_paths, device, precision)
    add_catalog(con, data)
    columns = [row[0] for row in con.execute("DESCRIBE catalog").fetchall()]
    keep = [quote_ident(c) for c in ("row", DEFAULT_KEY, "title") if c == "row" or c in columns]
    con.execute("CREATE TEMP TABLE selected AS SELECT * FROM "
                f"(SELECT row_number() OVER () AS \"row\", * FROM catalog) WHERE {condition}")
    df = con.sql(f"SELECT * FROM ({explanations_sql(scorers, 'selected', keep)}) ORDER BY \"row\", model").pl()
    if df.is_empty():
        raise NothingToEvaluateError("nothing to explain: the selection holds no catalog row (check --where)")
    if out:
        write_result(df, out)
    return df


def format_explanations(df: pl.DataFrame, limit: int) -> str:
    """explain's screen: the first ``limit`` rows of ``explain_rows``, then how the parts add up."""
    with pl.Config(tbl_rows=limit, tbl_cols=-1, float_precision=3, fmt_str_lengths=30, tbl_width_chars=250,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        table = str(df.head(limit))
    return (table + "\nbase + parts = unclamped; score = unclamped clamped to [1, 10]"
            + (f"; {limit} of {df.height} rows shown (--limit, --out)" if df.height > limit else ""))
