"""`anime-udf eval --report`: a self-contained HTML report whose numbers are the SQL's."""

import io
import json
import os
import re
from html.parser import HTMLParser

import duckdb
import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from scipy.stats import spearmanr

from anime_udf.cli import cli
from anime_udf.evaluation import RELIABILITY_LEVELS
from anime_udf.scoring import load_scorer
from tests.browser import chromium_path, visit
from tests.conftest import HOLDOUT, ROOT


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


class Cell(str):
    """A table cell's text, with its CSS classes."""

    classes: tuple[str, ...] = ()


class Tables(HTMLParser):
    """Every <table> of a page, as lists of rows of cells."""

    def __init__(self, page: str):
        super().__init__()
        self.tables, self._rows, self._cell, self._classes = [], None, None, ()
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._rows = []
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag in ("td", "th") and self._rows is not None:
            self._cell, self._classes = "", tuple((dict(attrs).get("class") or "").split())

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            cell = Cell(self._cell)
            cell.classes = self._classes
            self._rows[-1].append(cell)
            self._cell = None
        elif tag == "table":
            self.tables.append(self._rows)
            self._rows = None

    def find(self, *headings: str) -> list[dict]:
        """The rows, as dicts, of the table whose headings start with ``headings``."""
        [table] = [t for t in self.tables if tuple(t[0][:len(headings)]) == headings]
        return [dict(zip(table[0], row)) for row in table[1:]]


@pytest.fixture(scope="module")
def two_model_report(baseline_bundle, fusion_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    result = run("eval", "--data", HOLDOUT, "--model", baseline_bundle, "--model", fusion_bundle, "--report", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def holdout_predictions(bundle) -> np.ndarray:
    df = pl.read_csv(HOLDOUT)
    return load_scorer(bundle).predict(*(df[c].to_list() for c in ("synopsis", "genres", "studio", "episodes")))


def test_report_numbers_equal_eval_and_scipy(two_model_report, baseline_bundle, fusion_bundle, warm_cache):
    """The report's numbers against eval's and scipy's, computed from the embeddings the report's
    were (the module's report is made with the session's cache): no recomputation to tolerate."""
    out, printed = two_model_report
    page = out.read_text()
    tables = Tables(page)
    shown = {row["model"]: row for row in tables.find("model", "n", "MAE")}
    evaluated = json.loads(run("eval", "--data", HOLDOUT, "--model", baseline_bundle, "--model", fusion_bundle,
                               "--json").stdout)
    holdout = pl.read_csv(HOLDOUT)
    y = holdout["score"].to_numpy()
    mean = json.loads((baseline_bundle / "manifest.json").read_text())["target"]["mean"]
    for row in evaluated:
        yhat = holdout_predictions(baseline_bundle if row["model"] == "baseline" else fusion_bundle)
        expected = {"mae": np.mean(np.abs(y - yhat)), "rmse": np.sqrt(np.mean((y - yhat) ** 2)),
                    "spearman": spearmanr(y, yhat).statistic,
                    "r2": 1 - np.sum((y - yhat) ** 2) / np.sum((y - y.mean()) ** 2)}
        for column, heading in (("mae", "MAE"), ("rmse", "RMSE"), ("spearman", "Spearman"), ("r2", "R²")):
            assert float(shown[row["model"]][heading]) == pytest.approx(row[column], abs=5e-5)
            assert row[column] == pytest.approx(expected[column], abs=1e-5)
        assert int(shown[row["model"]]["n"]) == row["n"] == holdout.height
    # the reference row, in the report and in the terminal: a constant prediction of the training mean
    reference = shown["training mean"]
    assert float(reference["MAE"]) == pytest.approx(np.mean(np.abs(y - mean)), abs=5e-5)
    assert reference["Spearman"] == "—"
    assert re.search(r"training mean\s*┆\s*120\s*┆\s*" + f"{np.mean(np.abs(y - mean)):.4f}", printed)
    # the best value of each column is marked, and only that one
    for column, heading, pick in (("mae", "MAE", min), ("rmse", "RMSE", min), ("spearman", "Spearman", max),
                                  ("r2", "R²", max)):
        winner = pick(evaluated, key=lambda r: r[column])["model"]
        assert [m for m, row in shown.items() if "best" in row[heading].classes] == [winner], heading

    # calibration: deciles of prediction, as scipy/numpy cut them
    fusion = holdout_predictions(fusion_bundle)
    order = np.argsort(fusion, kind="stable")
    calibration = [r for r in tables.find("model", "bin", "n") if r["model"] == "fusion"]
    assert [int(r["n"]) for r in calibration] == [12] * 10
    for decile, row in zip(np.split(order, 10), calibration):
        assert float(row["mean_predicted"]) == pytest.approx(fusion[decile].mean(), abs=5e-5)
        assert float(row["mean_actual"]) == pytest.approx(y[decile].mean(), abs=5e-5)

    # residuals: predicted - actual in bins of 0.25, as numpy counts them
    lower, n = np.unique(np.floor((fusion - y) / 0.25) * 0.25, return_counts=True)
    histogram = [r for r in tables.find("model", "lower", "n") if r["model"] == "fusion"]
    assert [(float(r["lower"]), int(r["n"])) for r in histogram] == list(zip(lower.tolist(), n.tolist()))

    # error by genre: the most frequent genre first, its MAE as numpy computes it
    genres = holdout["genres"].str.split(",").list.eval(pl.element().str.strip_chars().str.to_lowercase())
    counts = genres.explode().value_counts()
    top = counts.sort(["count", "genres"], descending=[True, False]).row(0)[0]  # ties by name, as the SQL
    has_top = genres.list.contains(top).to_numpy()
    first = tables.find("model", "genre", "n")[:3]
    assert [r["model"] for r in first] == ["baseline", "fusion", "training mean"]
    assert first[0]["genre"].lower() == top and int(first[0]["n"]) == has_top.sum()
    assert float(first[1]["mae"]) == pytest.approx(np.mean(np.abs(y - fusion)[has_top]), abs=5e-5)


def test_report_renders_offline_in_a_browser_with_every_chart_drawn(two_model_report):
    if chromium_path() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: .ci/run installs the Debian package chromium")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from PIL import Image

    out, _ = two_model_report
    page = visit(out, "img.chart")
    assert page.console_errors == []
    assert [url for url in page.requests if not url.startswith("data:")] == [out.resolve().as_uri()]
    assert [box["label"] for box in page.boxes] == [
        "predicted vs actual score per model", "histogram of the residuals per model", "mean absolute error by genre",
        "mean absolute error by episodes", "mean absolute error by studio",
        "calibration: mean actual per bin of prediction", "interval coverage against the level",
        "interval coverage by band", "interval coverage by genre", "interval coverage by episodes",
        "mean absolute part per input group"]
    shot = Image.open(io.BytesIO(page.screenshot)).convert("RGB")
    for box in page.boxes:
        chart = np.asarray(shot.crop((int(box["x"]), int(box["y"]), int(box["x"] + box["width"]),
                                      int(box["y"] + box["height"]))))
        assert chart.shape[0] > 150 and chart.shape[1] > 300, box
        inked = (chart.min(axis=2) < 200).mean()  # pixels that are not white or near it
        colours = {tuple(c) for c in chart.reshape(-1, 3)[::7]}
        assert inked > 0.02 and len(colours) > 20, (box["label"], inked, len(colours))
        for rgb in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):  # both models are drawn, in their colours
            assert (np.abs(chart.astype(int) - rgb).max(axis=2) < 40).sum() > 30, (box["label"], rgb)


def test_report_of_one_model_with_null_scores_skips_and_counts_them(baseline_bundle, tmp_path):
    holdout = pl.read_csv(HOLDOUT)
    blanked = holdout.with_columns(
        pl.when(pl.int_range(pl.len()) % 20 == 3).then(None).otherwise(pl.col("score")).alias("score"))
    data = tmp_path / "partly-scored.csv"
    blanked.write_csv(data)
    out = tmp_path / "one.html"
    result = run("eval", "--data", data, "--model", baseline_bundle, "--report", out)
    assert result.exit_code == 0, result.output
    assert "skipped 6 selected row(s) without a score" in result.output
    page = out.read_text()
    assert "6 without a score skipped" in page
    tables = Tables(page)
    assert {r["model"]: int(r["n"]) for r in tables.find("model", "n", "MAE")} == {"baseline": 114,
                                                                                  "training mean": 114}
    assert tables.find("anime_id", "title", "actual")[0].keys() == {
        "anime_id", "title", "actual", "baseline predicted", "baseline interval", "largest error"}
    assert page.count('<img class="chart"') == 11  # seven, and the intervals' four
    assert {int(r["n"]) for r in tables.find("model", "level", "n", "coverage")} == {114}  # the scored rows only
    # the figures agree with eval on the same rows
    [row] = json.loads(run("eval", "--data", data, "--model", baseline_bundle, "--json").stdout)
    assert row["n"] == 114
    assert float(tables.find("model", "n", "MAE")[0]["MAE"]) == pytest.approx(row["mae"], abs=5e-5)


def test_an_empty_selection_is_a_clear_error_and_writes_no_report(baseline_bundle, tmp_path):
    out = tmp_path / "empty.html"
    result = run("eval", "--data", HOLDOUT, "--model", baseline_bundle, "--where", "anime_id < 0", "--report", out)
    assert result.exit_code == 1
    assert "nothing to evaluate: the selection holds none of the 120 catalog rows" in result.output
    unscored = tmp_path / "unscored.csv"
    pl.read_csv(HOLDOUT).with_columns(pl.lit(None, pl.Float64).alias("score")).write_csv(unscored)
    result = run("eval", "--data", unscored, "--model", baseline_bundle, "--where", "anime_id % 2 = 0",
                 "--report", out)
    assert result.exit_code == 1 and "none of the 60 selected rows has a score" in result.output
    assert not out.exists()
    result = run("eval", "--data", HOLDOUT, "--model", baseline_bundle, "--report", tmp_path / "report.pdf")
    assert result.exit_code == 2 and "use an .html file name" in result.output


def test_the_documented_recipe_reproduces_the_report_in_plain_duckdb(two_model_report, baseline_bundle, fusion_bundle,
                                                                     warm_cache):
    """The SQL of docs/evaluation.md, run on `anime-udf score` output in a DuckDB without the models, gives the
    report's numbers."""
    out, _ = two_model_report
    scored = run("score", "--data", HOLDOUT, "--out", "scored.parquet", "--model", baseline_bundle,
                 "--model", fusion_bundle)
    assert scored.exit_code == 0, scored.output
    page = (ROOT / "docs" / "evaluation.md").read_text()
    [recipe] = [block for block in re.findall(r"```sql\n(.*?)```", page, re.S) if "UNPIVOT" in block]
    recipe = recipe.replace("models/baseline-…", str(baseline_bundle))
    con = duckdb.connect()
    for line in recipe.splitlines():
        if line.startswith(".read"):  # a duckdb shell command: run the file
            con.execute((ROOT / line.split()[1]).read_text())
    con.execute("\n".join(line for line in recipe.splitlines() if not line.startswith(".read"))).fetchall()
    tables = Tables(out.read_text())
    for query, headings, shown_value, value in (
            ("regression_metrics('evaluated')", ("model", "n", "MAE"), "MAE", "mae"),
            ("error_by_studio('evaluated', 12)", ("model", "studio", "n"), "mae", "mae"),
            ("calibration('predictions', 10)", ("model", "bin", "n"), "mean_actual", "mean_actual")):
        reproduced = con.sql(f"SELECT * FROM {query}").pl()
        shown = tables.find(*headings)
        assert len(shown) == reproduced.height, query
        for row, again in zip(shown, reproduced.iter_rows(named=True)):
            assert [row[h] for h in headings if h != "MAE"] == [str(again[h]) for h in headings if h != "MAE"]
            assert float(row[shown_value]) == pytest.approx(again[value], abs=5e-5), query


def test_dollar_signs_in_studios_and_genres_are_drawn_as_text(baseline_bundle, tmp_path):
    import base64

    holdout = pl.read_csv(HOLDOUT)
    odd = holdout.with_columns(
        studio=pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.lit(r"$\frac{1}{$")).otherwise(pl.col("studio")),
        genres=pl.lit("$x$, ") + pl.col("genres"))
    data = tmp_path / "dollars.csv"
    odd.write_csv(data)
    out = tmp_path / "report.html"
    result = run("eval", "--data", data, "--model", baseline_bundle, "--report", out)
    assert result.exit_code == 0, result.output
    charts = [base64.b64decode(src).decode() for src in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"',
                                                                     out.read_text())]
    # a literal "$" is drawn as the font's dollar glyph; as math it is not drawn, and x is in italics
    assert sum('id="DejaVuSans-7"' in svg for svg in charts) == 3  # the genre, studio and interval-by-genre charts
    assert not any("Oblique" in svg for svg in charts)


def test_report_shows_each_models_parts_as_explain_computes_them(two_model_report, baseline_bundle, fusion_bundle):
    """The largest misses' parts and the mean |part| chart's numbers are those of explain_score /
    explain_score_fusion (through `anime-udf explain`), and the parts add up to the prediction."""
    out, _ = two_model_report
    tables = Tables(out.read_text())
    explained = run("explain", "--data", HOLDOUT, "--model", baseline_bundle, "--model", fusion_bundle,
                    "--out", "parts.parquet")
    assert explained.exit_code == 0, explained.output
    parts = pl.read_parquet("parts.parquet")
    groups = {"baseline": ["synopsis", "genres", "studio", "episodes"],
              "fusion": ["synopsis", "genres", "studio", "episodes", "lexical"]}
    shown = tables.find("anime_id", "title", "model", "actual", "predicted")
    assert len(shown) == 40 and [r["model"] for r in shown[:2]] == ["baseline", "fusion"]
    for row in shown:
        [expected] = parts.filter((pl.col("anime_id") == int(row["anime_id"])) & (pl.col("model") == row["model"])
                                  ).to_dicts()
        for group in groups[row["model"]]:
            assert float(row[group]) == pytest.approx(expected[group], abs=0.006), group
            assert ("raised" in row[group].classes) == (float(row[group]) > 0)
        assert float(row["predicted"]) == pytest.approx(expected["score"], abs=0.006)
        total = float(row["base"]) + sum(float(row[g]) for g in groups[row["model"]])
        assert total == pytest.approx(float(row["predicted"]), abs=0.005 * (len(groups[row["model"]]) + 2))
    assert all(row["lexical"] == "" for row in shown if row["model"] == "baseline")
    mean_abs = {(r["model"], r["group"]): float(r["mean_abs_part"]) for r in tables.find("model", "group", "n")}
    assert set(mean_abs) == {(m, g) for m, gs in groups.items() for g in gs}
    for (model, group), value in mean_abs.items():
        assert value == pytest.approx(parts.filter(pl.col("model") == model)[group].abs().mean(), abs=5e-5)


def test_report_with_a_bundle_that_cannot_explain_says_to_retrain(unexplainable_baseline, tmp_path):
    out = tmp_path / "old.html"
    result = run("eval", "--data", HOLDOUT, "--model", unexplainable_baseline, "--report", out)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    name = json.loads((unexplainable_baseline / "manifest.json").read_text())["name"]
    assert f"{name} cannot explain its scores" in page and "retrain the model to explain it" in page
    assert page.count('<img class="chart"') == 10  # no parts; the intervals' four charts
    assert Tables(page).find("anime_id", "title", "actual")[0]["actual"]


def holdout_columns() -> list[list]:
    df = pl.read_csv(HOLDOUT)
    return [df[c].to_list() for c in ("synopsis", "genres", "studio", "episodes")]


def test_report_intervals_are_the_interval_functions_counted(two_model_report, baseline_bundle, fusion_bundle,
                                                             warm_cache):
    """The reliability table, the coverage by fifth of the score and each largest miss's interval
    against the bounds of the interval functions (Scorer.predict_interval), counted in numpy, and
    each constant width against its calibration's half width."""
    out, _ = two_model_report
    tables = Tables(out.read_text())
    holdout = pl.read_csv(HOLDOUT)
    y, columns = holdout["score"].to_numpy(), holdout_columns()
    reliability = {(r["model"], float(r["level"])): r for r in tables.find("model", "level", "n", "coverage")}
    assert len(reliability) == 4 * len(RELIABILITY_LEVELS)
    misses = tables.find("anime_id", "title", "actual")
    assert misses and all(f"{kind} interval" in misses[0] for kind in ("baseline", "fusion"))
    for kind, bundle in (("baseline", baseline_bundle), ("fusion", fusion_bundle)):
        scorer = load_scorer(bundle)
        score = scorer.predict(*columns)
        coverages = []
        for level in RELIABILITY_LEVELS:
            bounds = scorer.predict_interval(*columns, [level] * len(y))
            inside = (y >= bounds["lo"]) & (y <= bounds["hi"])
            row = reliability[(kind, level)]
            assert int(row["n"]) == len(y)
            assert float(row["coverage"]) == pytest.approx(inside.mean(), abs=5e-5)
            assert float(row["mean_width"]) == pytest.approx(np.mean(bounds["hi"] - bounds["lo"]), abs=5e-5)
            coverages.append(float(row["coverage"]))
            half = scorer.calibration().constant_half_width(level)
            lo, hi = np.maximum(1.0, score - half), np.minimum(10.0, score + half)
            constant = reliability[(f"{kind} constant width", level)]
            assert float(constant["coverage"]) == pytest.approx(np.mean((y >= lo) & (y <= hi)), abs=5e-5)
            assert float(constant["mean_width"]) == pytest.approx(np.mean(hi - lo), abs=5e-5)
        assert coverages == sorted(coverages)  # a higher level covers at least as many rows
        # at the report's level (0.9 without --level): fifths of the score, ties in row order
        bounds = scorer.predict_interval(*columns, [0.9] * len(y))
        inside = (y >= bounds["lo"]) & (y <= bounds["hi"])
        bands = [r for r in tables.find("band", "model", "n") if r["model"] == kind]
        assert [r["band"] for r in bands] == ["1", "2", "3", "4", "5"]
        for fifth, row in zip(np.split(np.argsort(score, kind="stable"), 5), bands):
            assert int(row["n"]) == len(fifth)
            assert float(row["coverage"]) == pytest.approx(inside[fifth].mean(), abs=5e-5)
            assert float(row["lowest_predicted"]) == pytest.approx(score[fifth].min(), abs=5e-5)
        by_key = dict(zip(holdout["anime_id"].to_list(), zip(bounds["lo"], bounds["hi"])))
        for miss in misses:
            lo, hi = (float(v) for v in miss[f"{kind} interval"].split(" – "))
            assert (lo, hi) == pytest.approx(by_key[int(miss["anime_id"])], abs=0.006)  # shown to 2 decimals


def test_report_intervals_follow_eval_level(baseline_bundle, tmp_path, warm_cache):
    out = tmp_path / "level.html"
    result = run("eval", "--data", HOLDOUT, "--model", baseline_bundle, "--level", "0.8", "--report", out)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "Coverage of the intervals at 0.8" in page and "with its interval at 0.8" in page
    holdout = pl.read_csv(HOLDOUT)
    y = holdout["score"].to_numpy()
    bounds = load_scorer(baseline_bundle).predict_interval(*holdout_columns(), [0.8] * len(y))
    inside = (y >= bounds["lo"]) & (y <= bounds["hi"])
    genres = holdout["genres"].str.split(",").list.eval(pl.element().str.strip_chars().str.to_lowercase())
    for row in Tables(page).find("genre", "model", "n"):
        if row["model"] == "baseline":
            has = genres.list.contains(row["genre"].lower()).to_numpy()
            assert int(row["n"]) == has.sum()
            assert float(row["coverage"]) == pytest.approx(inside[has].mean(), abs=5e-5)
