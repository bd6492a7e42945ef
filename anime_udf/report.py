"""The evaluation report: one self-contained HTML file (`anime-udf eval --report FILE.html`).

Every number in it, and the data of every chart, is the result of a query shown beside it:
the macros of sql/metrics.sql and sql/report.sql run on the tables `eval` builds (see
anime_udf.evaluation). matplotlib only draws, to SVG inlined as data: URIs; a
Content-Security-Policy forbids the page any fetch, so it opens offline from a file:// URL.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from anime_udf.evaluation import (CONSTANT_WIDTH, EVALUATED, EXPLANATIONS, INTERVALS, PREDICTIONS, RELIABILITY,
                                  EvalResult, Evaluation, ReportIntervals, build_report_intervals, load_report_macros)
from anime_udf.explain import GROUPS
from anime_udf.files import atomic_file

TOP_GROUPS = 12  # genres and studios shown
CALIBRATION_BINS = 10
SCORE_BANDS = 5  # the intervals' coverage in fifths of the predicted score
LARGEST_MISSES = 20
HEXBIN_ABOVE = 1000  # rows per model above which predicted vs actual is drawn as a density
COLORS = {"baseline": "#1f77b4", "fusion": "#ff7f0e"}
SPARE_COLORS = ("#2ca02c", "#d62728", "#9467bd")
REFERENCE_COLOR = "#a8a8a8"
# The metrics table's columns: (column, heading, higher is better).
METRICS = (("mae", "MAE", False), ("rmse", "RMSE", False), ("spearman", "Spearman", True), ("r2", "R²", True))
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; max-width: 1180px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; } th, td { padding: .25em .7em; border-bottom: 1px solid #e4e4e4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } th { text-align: left; background: #f5f5f5; }
td.best { font-weight: 700; background: #e3f2e1; } td.raised { color: #1b6e1b; } td.lowered { color: #b22222; } tr.reference td { color: #666; font-style: italic; }
dl.about { display: grid; grid-template-columns: max-content auto; gap: .1em 1em; } dl.about dt { color: #666; }
img.chart { display: block; max-width: 100%; height: auto; margin: .6em 0; }
pre { background: #f7f7f7; padding: .6em .8em; overflow-x: auto; font-size: 13px; }
details { margin: .4em 0 1em; } summary { cursor: pointer; color: #555; } p.note { color: #555; }
"""


def write_eval_report(result: EvalResult, out: Path, *, catalog: Path, where: str | None) -> None:
    """eval --report: the report of what ``evaluation.evaluate`` computed, with the intervals at its
    level (else ``REPORT_LEVEL``)."""
    intervals = build_report_intervals(result.con, result.scorers, result.level, result.interval_statements)
    write_report(result.con, result.evaluation, out, catalog=catalog, where=where, intervals=intervals)


def write_report(con: duckdb.DuckDBPyConnection, evaluation: Evaluation, out: Path, *,
                 catalog: Path, where: str | None, intervals: ReportIntervals | None = None) -> None:
    """Render the report from ``evaluation``'s tables (and ``intervals``') on ``con`` and write it to ``out``."""
    page = render_report(con, evaluation, catalog=catalog, where=where, intervals=intervals)
    with atomic_file(out) as tmp:
        tmp.write_text(page, encoding="utf-8")


def render_report(con: duckdb.DuckDBPyConnection, evaluation: Evaluation, *, catalog: Path,
                  where: str | None, intervals: ReportIntervals | None = None) -> str:
    import matplotlib  # here, not at the top: `import anime_udf` and --help stay light

    load_report_macros(con)
    colors = _colors(evaluation)
    scored = con.execute(f"SELECT count(DISTINCT row_id) FROM {PREDICTIONS}").fetchall()[0][0]
    residual_width = 0.1 if scored >= HEXBIN_ABOVE else 0.25
    with_intervals = intervals is not None and not intervals.uncalibrated
    queries = _report_queries(residual_width, with_intervals, explained=not evaluation.unexplained)
    data = {name: con.sql(sql).pl() for name, sql in queries.items()}
    # Glyphs as paths: the SVGs need no font; a fixed salt keeps their element ids the same run to run.
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "anime-udf", "font.size": 10}):
        sections = _error_sections(data, evaluation, colors, scored, residual_width)
        if with_intervals:
            sections += _interval_sections(data, queries, evaluation, colors, intervals.level)
        elif intervals is not None:
            sections.append(("Prediction intervals", "reliability", "", "Not shown: "
                             + ", ".join(intervals.uncalibrated) + " has no calibration (trained before prediction "
                             "intervals); retrain the model to score its intervals."))
            queries["reliability"] = ""
        sections += _miss_sections(data, queries, evaluation, colors, intervals if with_intervals else None)
    return _page(evaluation, intervals.statements if intervals else (), catalog, where, scored,
                 [_section(title, body, queries[name], note) for title, name, body, note in sections])


def _report_queries(residual_width: float, with_intervals: bool, explained: bool) -> dict[str, str]:
    """The query of each of the report's tables, by name."""
    queries = {
        "metrics": f"SELECT * FROM regression_metrics('{EVALUATED}')",
        "points": f"SELECT model, y, yhat FROM {PREDICTIONS}",
        "residuals": f"SELECT * FROM residual_histogram('{PREDICTIONS}', {residual_width})",
        "genre": f"SELECT * FROM error_by_genre('{EVALUATED}', {TOP_GROUPS})",
        "episodes": f"SELECT * FROM error_by_episodes('{EVALUATED}')",
        "studio": f"SELECT * FROM error_by_studio('{EVALUATED}', {TOP_GROUPS})",
        "calibration": f"SELECT * FROM calibration('{PREDICTIONS}', {CALIBRATION_BINS})",
        "misses": f"SELECT * FROM largest_misses('{PREDICTIONS}', {LARGEST_MISSES})",
    }
    if with_intervals:
        queries |= {
            "reliability": f"SELECT * FROM interval_reliability('{RELIABILITY}')",
            "band": f"SELECT * FROM interval_by_band('{INTERVALS}', {SCORE_BANDS})",
            "interval_genre": f"SELECT * FROM interval_by_genre('{INTERVALS}', {TOP_GROUPS})",
            "interval_episodes": f"SELECT * FROM interval_by_episodes('{INTERVALS}')",
            "miss_intervals": f"SELECT * FROM largest_miss_intervals('{PREDICTIONS}', '{INTERVALS}', {LARGEST_MISSES})",
        }
    if explained:
        queries["parts"] = f"SELECT * FROM mean_abs_parts('{EXPLANATIONS}')"
        queries["miss_parts"] = f"SELECT * FROM largest_miss_parts('{PREDICTIONS}', '{EXPLANATIONS}', {LARGEST_MISSES})"
    return queries


def _error_sections(data: dict[str, pl.DataFrame], evaluation: Evaluation, colors: dict[str, str], scored: int,
                    residual_width: float) -> list[tuple[str, str, str, str]]:
    """The report's sections on the errors: metrics, predicted vs actual, residuals, error by group, calibration."""
    density = (f" Above {HEXBIN_ABOVE} rows a model's chart is a density: hexagons shaded by their number of rows."
               if scored > HEXBIN_ABOVE else "")
    sections = [
        ("Metrics", "metrics", _metrics_table(data["metrics"], evaluation),
         "The best value of each column is highlighted. The reference predicts every row as the mean score "
         "of the models' training data: a model must beat it to have learned anything."),
        ("Predicted vs actual", "points",
         _chart(_scatter_figure(data["points"], evaluation, colors), "predicted vs actual score per model"),
         "Each model's predictions against the true scores; on the dashed diagonal a prediction is exact."
         + density),
        ("Residuals", "residuals",
         _chart(_residual_figure(data["residuals"], evaluation, colors, residual_width),
                "histogram of the residuals per model") + _details(data["residuals"]),
         "Predicted minus actual score: right of zero a model scored a title too high, left too low."),
    ]
    for name, title, note in (
        ("genre", "Error by genre", f"The {TOP_GROUPS} most frequent genres; a title counts in each of its genres."),
        ("episodes", "Error by episode count", "Buckets of the episode count; 'unknown' is missing or negative."),
        ("studio", "Error by studio", f"The {TOP_GROUPS} studios with the most titles."),
    ):
        groups = data[name]
        body = (_chart(_group_figure(groups, name, colors), f"mean absolute error by {name}") + _details(groups)
                if groups.height else f'<p class="note">No row has a {name}.</p>')
        sections.append((title, name, body, note + " Bars: mean absolute error per model (n: rows)."))
    sections.append(
        ("Calibration", "calibration",
         _chart(_calibration_figure(data["calibration"], evaluation, colors),
                "calibration: mean actual per bin of prediction") + _details(data["calibration"]),
         f"Each model's rows cut into {CALIBRATION_BINS} equal bins by prediction: the mean actual score "
         "against the mean prediction of each. Below the diagonal, titles predicted that high score lower."))
    return sections


def _miss_sections(data: dict[str, pl.DataFrame], queries: dict[str, str], evaluation: Evaluation,
                   colors: dict[str, str], intervals: ReportIntervals | None) -> list[tuple[str, str, str, str]]:
    """What each model listens to (where the bundles can explain), then the largest misses with their
    parts and, with ``intervals`` (calibrated), their intervals."""
    explained = not evaluation.unexplained
    miss_intervals = data.get("miss_intervals")
    if explained:
        sections = [("What each model listens to", "parts",
                     _chart(_parts_figure(data["parts"], colors), "mean absolute part per input group")
                     + _details(data["parts"]), PARTS_NOTE)]
        misses = (_misses_table(data["misses"], evaluation, miss_intervals)
                  + _miss_parts_table(data["miss_parts"], evaluation))
        queries["misses"] += f";\n{queries['miss_parts']}"
    else:
        sections = [("What each model listens to", "parts", "", "Not shown: "
                     + ", ".join(evaluation.unexplained) + " cannot explain its scores (trained before "
                     "explanations were stored in bundles); retrain the model to explain it.")]
        queries["parts"], misses = "", _misses_table(data["misses"], evaluation, miss_intervals)
    if intervals is not None:
        queries["misses"] += f";\n{queries['miss_intervals']}"
    sections.append(("Largest misses", "misses", misses,
                     f"The {LARGEST_MISSES} rows that any model missed most"
                     + (f", each model's prediction with its interval at {intervals.level:g}"
                        if intervals is not None else "")
                     + (", then why: each model's parts of its prediction (green raised it, red lowered it)."
                        if explained else ".")))
    return sections


def _interval_sections(data: dict[str, pl.DataFrame], queries: dict[str, str], evaluation: Evaluation,
                       colors: dict[str, str], level: float) -> list[tuple[str, str, str, str]]:
    """The report's sections on the prediction intervals: the reliability chart, then coverage
    and width by band of the predicted score, genre and episodes at ``level``."""
    groups = []
    for name, column, what in (("band", "band", "fifth of the predicted score (1: the lowest)"),
                               ("interval_genre", "genre", f"the {TOP_GROUPS} most frequent genres"),
                               ("interval_episodes", "episodes", "episode count")):
        table = data[name]
        if table.height:
            groups.append(_chart(_coverage_figure(table, column, evaluation, colors, level),
                                 f"interval coverage by {column}") + _details(table))
        else:
            groups.append(f'<p class="note">No row has a {column}.</p>')
    queries["interval_groups"] = ";\n".join(queries[n] for n in ("band", "interval_genre", "interval_episodes"))
    return [
        ("Prediction intervals", "reliability",
         _chart(_reliability_figure(data["reliability"], evaluation, colors), "interval coverage against the level")
         + _details(data["reliability"]),
         "Each model's prediction intervals (predict_score_interval, predict_score_fusion_interval) at levels from "
         "0.5 to 0.95: the share of rows inside their interval against the level asked for. On the diagonal the "
         "coverage is the level; below it the intervals are too narrow for these rows. Dashed: the model's "
         f"{CONSTANT_WIDTH}, its score ± the one width that covers the level of the same calibration rows."),
        ("Interval coverage by group", "interval_groups", "".join(groups),
         f"Coverage of the intervals at {level:g} (the line) by fifth of the predicted score, genre (a title counts "
         "in each of its genres) and episode count; the tables add each group's mean width and each constant width."),
    ]


def _reliability_figure(reliability: pl.DataFrame, evaluation: Evaluation, colors: dict[str, str]):
    fig = _figure(5.6, 5.2)
    ax = fig.subplots()
    ax.plot([0.45, 1.0], [0.45, 1.0], color="#333", lw=1, ls=":", label="coverage = level")
    for model in evaluation.models:
        for label, style in ((model, "-"), (f"{model} {CONSTANT_WIDTH}", "--")):
            rows = reliability.filter(pl.col("model") == label)
            ax.plot(rows["level"], rows["coverage"], marker="o", ls=style, color=colors[model], label=label)
    lowest = min(0.4, float(reliability["coverage"].min()) - 0.05)
    ax.set(xlabel="level", ylabel="observed coverage", xlim=(0.45, 1.0), ylim=(lowest, 1.02))
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return fig


def _coverage_figure(table: pl.DataFrame, column: str, evaluation: Evaluation, colors: dict[str, str], level: float):
    """Bars of each model's coverage per group of ``column`` (the groups in the table's order), a line at ``level``."""
    names = table[column].unique(maintain_order=True).to_list()
    counts = dict(table.filter(pl.col("model") == evaluation.models[0]).select(column, "n").iter_rows())
    fig = _bars_figure(_values_by_model(table, list(evaluation.models), column, "coverage"), names,
                       [f"{_literal(str(name))} (n={counts.get(name, 0)})" for name in names],
                       f"coverage at level {level:g}", colors)
    fig.axes[0].axvline(level, color="#333", lw=1, ls="--")
    fig.axes[0].set_xlim(0, 1)
    return fig


PARTS_NOTE = ("Each prediction is the model's base score (every input at its reference: docs/sql.md, "
              "\"What absent means\") "
              "plus one part per input group, their exact Shapley values (explain_score, explain_score_fusion). "
              "Bars: the mean absolute part over the evaluated rows, how far each group moves a model's predictions.")


def _colors(evaluation: Evaluation) -> dict[str, str]:
    spare = iter(SPARE_COLORS)
    colors = {m: COLORS.get(m) or next(spare) for m in evaluation.models}
    return colors | {label: REFERENCE_COLOR for label in evaluation.references}


# --- charts -----------------------------------------------------------------------------------

def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), layout="constrained")


def _chart(fig, alt: str) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    data = base64.b64encode(buffer.getvalue().encode()).decode()
    return f'<img class="chart" alt="{html.escape(alt)}" src="data:image/svg+xml;base64,{data}">'


def _scatter_figure(points: pl.DataFrame, evaluation: Evaluation, colors: dict[str, str]):
    models = evaluation.models
    fig = _figure(4.4 * len(models) + 0.8, 4.4)
    axes = fig.subplots(1, len(models), squeeze=False, sharex=True, sharey=True)[0]
    values = np.concatenate([points["y"].to_numpy(), points["yhat"].to_numpy()])
    lo, hi = float(values.min()) - 0.2, float(values.max()) + 0.2
    for ax, model in zip(axes, models):
        rows = points.filter(pl.col("model") == model)
        if rows.height > HEXBIN_ABOVE:
            density = ax.hexbin(rows["y"].to_numpy(), rows["yhat"].to_numpy(), gridsize=40, bins="log", mincnt=1,
                                cmap="viridis", extent=(lo, hi, lo, hi), linewidths=0.1)
            fig.colorbar(density, ax=ax, shrink=0.8, label="rows")
        else:
            ax.scatter(rows["y"], rows["yhat"], s=14, alpha=0.65, color=colors[model], edgecolors="none")
        ax.plot([lo, hi], [lo, hi], color="#333", lw=1, ls="--")
        ax.set(title=model, xlabel="actual score", xlim=(lo, hi), ylim=(lo, hi), aspect="equal")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("predicted score")
    return fig


def _residual_figure(histogram: pl.DataFrame, evaluation: Evaluation, colors: dict[str, str], width: float):
    fig = _figure(9, 3.8)
    ax = fig.subplots()
    for model in evaluation.models:
        rows = histogram.filter(pl.col("model") == model)
        bins = np.rint(rows["lower"].to_numpy() / width).astype(int)
        counts = np.zeros(bins.max() - bins.min() + 1)
        counts[bins - bins.min()] = rows["n"].to_numpy()
        edges = (np.arange(len(counts) + 1) + bins.min()) * width
        ax.stairs(counts, edges, color=colors[model], lw=1.8, label=model, fill=False)
        ax.stairs(counts, edges, color=colors[model], alpha=0.12, fill=True)
    ax.axvline(0, color="#333", lw=1, ls="--")
    ax.set(xlabel="residual: predicted − actual score", ylabel="rows")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return fig


def _group_figure(groups: pl.DataFrame, column: str, colors: dict[str, str]):
    models = groups["model"].unique(maintain_order=True).to_list()
    names = groups[column].unique(maintain_order=True).to_list()
    counts = dict(groups.filter(pl.col("model") == models[0]).select(column, "n").iter_rows())
    # groups arrive most frequent first: on top
    return _bars_figure(_values_by_model(groups, models, column, "mae"), names,
                        [f"{_literal(name)} (n={counts[name]})" for name in names], "mean absolute error", colors)


def _parts_figure(parts: pl.DataFrame, colors: dict[str, str]):
    models = parts["model"].unique(maintain_order=True).sort().to_list()
    groups = parts["group"].unique(maintain_order=True).to_list()
    return _bars_figure(_values_by_model(parts, models, "group", "mean_abs_part"), groups, groups,
                        "mean |part| (score points)", colors)


def _values_by_model(df: pl.DataFrame, models: list[str], label: str, value: str) -> dict[str, dict]:
    return {model: dict(df.filter(pl.col("model") == model).select(label, value).iter_rows()) for model in models}


def _bars_figure(values: dict[str, dict], labels: list, ticks: list[str], xlabel: str, colors: dict[str, str]):
    """Horizontal bars: one cluster per label, top to bottom in ``labels``' order, with one bar per
    model of ``values`` ({model: {label: value}}; a label a model lacks is 0)."""
    bar = 0.8 / len(values)
    fig = _figure(9, 0.9 + len(labels) * (0.22 + 0.14 * len(values)))
    ax = fig.subplots()
    for j, (model, by_label) in enumerate(values.items()):
        positions = np.arange(len(labels)) + (j - (len(values) - 1) / 2) * bar
        ax.barh(positions, [by_label.get(label, 0.0) for label in labels], height=bar, color=colors[model],
                label=model, hatch="//" if colors[model] == REFERENCE_COLOR else None, edgecolor="white",
                linewidth=0.5)
    ax.set_yticks(np.arange(len(labels)), ticks)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.legend(frameon=False, loc="lower left", bbox_to_anchor=(0, 1), ncol=len(values))
    ax.grid(axis="x", alpha=0.3)
    return fig


def _literal(text: str) -> str:
    """Catalog text as matplotlib draws it verbatim: an unescaped ``$`` would start math."""
    return text.replace("$", r"\$")


def _calibration_figure(calibration: pl.DataFrame, evaluation: Evaluation, colors: dict[str, str]):
    fig = _figure(5.6, 5.2)
    ax = fig.subplots()
    values = np.concatenate([calibration["mean_predicted"].to_numpy(), calibration["mean_actual"].to_numpy()])
    lo, hi = float(values.min()) - 0.2, float(values.max()) + 0.2
    ax.plot([lo, hi], [lo, hi], color="#333", lw=1, ls="--", label="calibrated")
    for model in evaluation.models:
        rows = calibration.filter(pl.col("model") == model)
        ax.plot(rows["mean_predicted"], rows["mean_actual"], marker="o", color=colors[model], label=model)
    ax.set(xlabel="mean predicted score (per bin of prediction)", ylabel="mean actual score",
           xlim=(lo, hi), ylim=(lo, hi), aspect="equal")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return fig


# --- tables and page --------------------------------------------------------------------------

def _number(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(headings: list[str], rows: list[list[tuple[str, str]]], row_classes: list[str] | None = None,
           table_id: str = "") -> str:
    """Rows of (text, css class) cells; text is escaped here."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headings)
    body = "".join(
        f'<tr class="{row_classes[i] if row_classes else ""}">'
        + "".join(f'<td class="{cls}">{html.escape(text)}</td>' for text, cls in row) + "</tr>"
        for i, row in enumerate(rows))
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _metrics_table(metrics: pl.DataFrame, evaluation: Evaluation) -> str:
    # models first, then the reference, each in the SQL's order
    metrics = metrics.sort(pl.col("model").is_in(list(evaluation.references)), maintain_order=True)
    best = {}
    for column, _, higher in METRICS:
        values = [v for v in metrics[column] if v is not None and np.isfinite(v)]
        if values:
            best[column] = max(values) if higher else min(values)
    rows = [[(row["model"], ""), (str(row["n"]), "num")]
            + [(_number(row[c]), "num best" if row[c] is not None and row[c] == best.get(c) else "num")
               for c, _, _ in METRICS]
            for row in metrics.iter_rows(named=True)]
    classes = ["reference" if m in evaluation.references else "" for m in metrics["model"]]
    return _table(["model", "n", *(h for _, h, _ in METRICS)], rows, classes, "metrics")


def _details(df: pl.DataFrame) -> str:
    rows = [[(_number(v), "num" if isinstance(v, (int, float)) else "") for v in row] for row in df.iter_rows()]
    return f"<details><summary>the numbers</summary>{_table(df.columns, rows)}</details>"


def _misses_table(misses: pl.DataFrame, evaluation: Evaluation, intervals: pl.DataFrame | None = None) -> str:
    """The largest misses, each model's prediction beside the actual score; with ``intervals``
    (largest_miss_intervals), each prediction's interval after it."""
    wide = misses.pivot(on="model", index=["row_id", "key", "title", "actual", "largest_error"],
                        values="predicted", maintain_order=True)
    bounds = {} if intervals is None else {(row["row_id"], row["model"]): (row["lo"], row["hi"])
                                           for row in intervals.iter_rows(named=True)}
    has_title = wide["title"].is_not_null().any()
    headings = [evaluation.key, *(["title"] if has_title else []), "actual",
                *(h for m in evaluation.models for h in (f"{m} predicted", *([f"{m} interval"] if bounds else []))),
                "largest error"]

    def interval(row_id, model) -> list[tuple[str, str]]:
        if not bounds:
            return []
        lo, hi = bounds.get((row_id, model), (None, None))
        return [(f"{_number(lo, 2)} – {_number(hi, 2)}", "num")]

    rows = [[(str(row["key"]), ""), *([(row["title"] or "", "")] if has_title else []),
             (_number(row["actual"], 2), "num"),
             *(cell for m in evaluation.models
               for cell in ((_number(row[m], 2), "num"), *interval(row["row_id"], m))),
             (_number(row["largest_error"], 2), "num")]
            for row in wide.iter_rows(named=True)]
    return _table(headings, rows, table_id="misses")


def _miss_parts_table(parts: pl.DataFrame, evaluation: Evaluation) -> str:
    """One row per (miss, model): actual, predicted, base and the parts, each part's sign shaded."""
    # the input groups of the models shown (a fusion's are a baseline's and lexical)
    groups = [g for g in GROUPS["fusion"] if g in parts.columns and parts[g].is_not_null().any()]
    has_title = parts["title"].is_not_null().any()
    headings = [evaluation.key, *(["title"] if has_title else []), "model", "actual", "predicted", "base", *groups]

    def part(value) -> tuple[str, str]:
        if value is None:
            return "", ""
        shown = f"{value:+.2f}"
        return shown, "num" + ("" if float(shown) == 0 else " raised" if value > 0 else " lowered")

    rows = [[(str(row["key"]), ""), *([(row["title"] or "", "")] if has_title else []), (row["model"], ""),
             (_number(row["actual"], 2), "num"), (_number(row["predicted"], 2), "num"),
             (_number(row["base"], 2), "num"), *(part(row[g]) for g in groups)]
            for row in parts.iter_rows(named=True)]
    return _table(headings, rows, table_id="miss-parts")


def _section(title: str, body: str, sql: str, note: str) -> str:
    shown = f"<details><summary>SQL</summary><pre>{html.escape(sql)};</pre></details>" if sql else ""
    return f"<section><h2>{html.escape(title)}</h2><p class=\"note\">{html.escape(note)}</p>{body}{shown}</section>"


def _page(evaluation: Evaluation, interval_statements: tuple[str, ...], catalog: Path, where: str | None,
          scored: int, sections: list[str]) -> str:
    rows = f"{scored} evaluated of {evaluation.selected_rows} selected ({evaluation.catalog_rows} in the catalog)"
    if evaluation.skipped_rows:
        rows += f"; {evaluation.skipped_rows} without a score skipped"
    about = [("catalog", str(catalog)), ("selection", where or "every row"), ("rows", rows),
             *((f"model: {m}", evaluation.bundles[m]) for m in evaluation.models),
             *((label, f"{mean:.4f} for every row") for label, mean in evaluation.references.items()),
             ("written", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))]
    about_html = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in about)
    statements = ";\n\n".join((*evaluation.statements, *interval_statements)) + ";"
    reproduce = (
        "<section><h2>Reproducing a figure</h2><p class=\"note\">Every number above is the result of the SQL "
        "shown with it, run on the tables below (built by <code>anime-udf eval</code> from the catalog as view "
        "<code>catalog</code>). In <code>anime-udf sql --table catalog=FILE</code> the models and the macros of "
        "sql/metrics.sql and sql/report.sql are available: run these statements, then any query above.</p>"
        f"<pre>{html.escape(statements)}</pre></section>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>anime-udf evaluation: {html.escape(catalog.name)}</title><style>{STYLE}</style></head>"
            f"<body><h1>Evaluation of {html.escape(', '.join(evaluation.models))}</h1>"
            f'<dl class="about">{about_html}</dl>{"".join(sections)}{reproduce}</body></html>\n')
