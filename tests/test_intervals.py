"""Prediction intervals (docs/intervals.md): the calibration a bundle keeps, the SQL functions'
contracts, the metrics and `eval --level`."""

import json
import shutil

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner

import anime_udf
from anime_udf.bundle import CALIBRATION_FILE, BundleError, read_manifest
from anime_udf.catalog import read_catalog
from anime_udf.cli import cli
from anime_udf.intervals import SCALE_FEATURES, conformal_quantile, guaranteed_coverage, scale_feature_names
from anime_udf.metrics import load_metric_macros
from tests.conftest import CATALOG, FP32_TOLERANCE, HOLDOUT, older_bundle
from tests.test_udf import EDGE_ROWS

INTERVALS = {"baseline": "predict_score_interval", "fusion": "predict_score_fusion_interval"}
SCORES = {"baseline": "predict_score", "fusion": "predict_score_fusion"}
ARGS = "synopsis, genres, studio, episodes"


@pytest.fixture
def con(kind, bundle):
    con = duckdb.connect()
    anime_udf.register(con, **{kind: bundle})
    con.register("catalog", read_catalog(HOLDOUT))
    con.execute("CREATE TABLE anime AS SELECT * FROM catalog")
    return con


def intervals(con, kind, level="0.9", table="anime"):
    """(score, lo, hi) of every row of ``table``, in anime_id order, from one query."""
    rows = con.execute(f"SELECT {SCORES[kind]}({ARGS}) AS p, {INTERVALS[kind]}({ARGS}, {level}) AS i "
                       f"FROM {table} ORDER BY anime_id").fetchall()
    return np.array([(p, i["lo"], i["hi"]) for p, i in rows])


def test_the_interval_holds_the_score_within_1_and_10(con, kind):
    found = intervals(con, kind)
    score, lo, hi = found.T
    assert len(found) == 120 and np.isfinite(found).all()
    assert ((1 <= lo) & (lo < score) & (score < hi) & (hi <= 10)).all()


def test_a_higher_level_gives_a_wider_interval(con, kind):
    widths = [np.mean(np.diff(intervals(con, kind, level)[:, 1:], axis=1)) for level in ("0.5", "0.8", "0.95")]
    assert widths[0] < widths[1] < widths[2]


def test_adaptive_widths_differ_between_titles(con, kind):
    _, lo, hi = intervals(con, kind).T
    assert np.ptp(hi - lo) > 0.05  # a constant width would be the same for every title inside [1, 10]


def test_a_level_per_row_gives_each_row_its_own_levels_interval(con, kind):
    con.execute("CREATE TABLE levelled AS SELECT *, CASE WHEN anime_id % 2 = 0 THEN 0.5 ELSE 0.95 END AS level "
                "FROM anime")
    per_row = intervals(con, kind, "level", "levelled")
    ids = [r[0] for r in con.execute("SELECT anime_id FROM levelled ORDER BY anime_id").fetchall()]
    even = np.array([i % 2 == 0 for i in ids])
    np.testing.assert_allclose(per_row[even], intervals(con, kind, "0.5")[even], atol=FP32_TOLERANCE, rtol=0)
    np.testing.assert_allclose(per_row[~even], intervals(con, kind, "0.95")[~even], atol=FP32_TOLERANCE, rtol=0)


def test_a_rows_interval_does_not_depend_on_its_batch(con, kind):
    whole = intervals(con, kind)
    first = con.execute("SELECT anime_id FROM anime ORDER BY anime_id LIMIT 1").fetchone()[0]
    alone = con.execute(f"SELECT {INTERVALS[kind]}({ARGS}, 0.9) FROM anime WHERE anime_id = {first}").fetchone()[0]
    assert alone["lo"] == pytest.approx(whole[0, 1], abs=FP32_TOLERANCE)
    assert alone["hi"] == pytest.approx(whole[0, 2], abs=FP32_TOLERANCE)


def test_missing_and_odd_inputs_get_an_interval_around_their_score(con, kind):
    con.execute("CREATE TABLE edge (anime_id INTEGER, synopsis VARCHAR, genres VARCHAR, studio VARCHAR, "
                "episodes DOUBLE)")
    con.executemany("INSERT INTO edge VALUES (?, ?, ?, ?, ?)", [(i, *row) for i, row in enumerate(EDGE_ROWS)])
    score, lo, hi = intervals(con, kind, table="edge").T
    assert ((1 <= lo) & (lo <= score) & (score <= hi) & (hi <= 10)).all() and (hi > lo).all()


@pytest.mark.parametrize("level, shown", [("NULL", "NULL"), ("0", "0.0"), ("1", "1.0"), ("1.5", "1.5"),
                                          ("-0.1", "-0.1"), ("'nan'::DOUBLE", "NaN")])
def test_a_level_outside_0_1_is_an_error_naming_it(con, kind, level, shown):
    with pytest.raises(duckdb.Error, match=rf"level must be a number strictly between 0 and 1 .*; got {shown}$"):
        con.execute(f"SELECT {INTERVALS[kind]}({ARGS}, {level}) FROM anime").fetchall()


def test_the_bundle_keeps_its_calibration_checksummed_and_states_it(bundle, tmp_path):
    bundle = shutil.copytree(bundle, tmp_path / "copy")  # the session's bundle is left whole
    manifest = read_manifest(bundle)
    calibration = manifest["calibration"]
    assert CALIBRATION_FILE in manifest["files"]
    # The selection run's validation rows, every one of them, and the coverage they promise.
    assert calibration["rows"] == manifest["training"]["rows_valid"]
    assert calibration["rows_chosen"] == manifest["training"]["validation"]
    assert calibration["scale_features"] == scale_feature_names(manifest["features"]["genres"])
    assert calibration["coverage"]["0.9"] == pytest.approx(guaranteed_coverage(calibration["rows"], 0.9))
    path = bundle / CALIBRATION_FILE
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(BundleError, match=r"calibration\.safetensors: checksum mismatch"):
        read_manifest(bundle)


def test_training_says_what_the_calibration_promises(tmp_path):
    from training.baseline import BaselineSettings, train_baseline
    from training.common import load_split

    lines = []
    manifest = train_baseline(load_split(CATALOG), tmp_path / "b", BaselineSettings(epochs=4, seeds=2),
                              progress=False, log=lines.append)
    said = next(line for line in lines if line.startswith("calibration:"))
    rows = manifest["calibration"]["rows"]
    assert f"calibration: {rows} validation rows" in said
    assert f"{guaranteed_coverage(rows, 0.9):.1%} at 0.9" in said


@pytest.fixture
def uncalibrated_baseline(baseline_bundle, tmp_path):
    """The fixture baseline as a bundle trained before intervals existed."""
    return older_bundle(baseline_bundle, tmp_path / "old-baseline", CALIBRATION_FILE, "calibration")


def test_a_bundle_without_calibration_scores_and_says_how_to_get_intervals(uncalibrated_baseline):
    con = duckdb.connect()
    anime_udf.register(con, baseline=uncalibrated_baseline)
    assert 1 <= con.execute("SELECT predict_score('A story.', 'Action', NULL, 12)").fetchone()[0] <= 10
    with pytest.raises(duckdb.Error, match=r"old-baseline: this bundle has no calibration .*; retrain it with "
                                           r"`anime-udf train baseline` to score intervals$"):
        con.execute("SELECT predict_score_interval('A story.', 'Action', NULL, 12, 0.9)").fetchall()
    result = CliRunner().invoke(cli, ["eval", "--data", str(HOLDOUT), "--model", str(uncalibrated_baseline),
                                      "--level", "0.9"])
    assert result.exit_code == 1 and "this bundle has no calibration" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_report_with_a_bundle_without_calibration_says_to_retrain(uncalibrated_baseline, tmp_path):
    out = tmp_path / "old.html"
    result = CliRunner().invoke(cli, ["eval", "--data", str(HOLDOUT), "--model", str(uncalibrated_baseline),
                                      "--report", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    name = json.loads((uncalibrated_baseline / "manifest.json").read_text())["name"]
    assert f"{name} has no calibration" in page and "retrain the model to score its intervals" in page
    assert "interval coverage" not in page and page.count('<img class="chart"') == 7


def test_the_conformal_quantile_is_the_ceil_n_plus_1_level_th_score():
    scores = np.arange(1.0, 10.0)  # n = 9
    found = conformal_quantile(scores, np.array([0.1, 0.5, 0.9, 0.95]))
    # ⌈10 × 0.1⌉ = 1st, ⌈5⌉ = 5th, ⌈9⌉ = 9th; ⌈9.5⌉ = 10th > n: no finite width covers it
    assert found.tolist() == [1.0, 5.0, 9.0, np.inf]
    assert guaranteed_coverage(9, 0.5) == 0.5 and guaranteed_coverage(9, 0.95) == 1.0


def test_the_scale_model_widens_intervals_where_errors_run_wider():
    """Rows of an unknown studio err three times as widely: the adaptive interval covers each
    group at its level, where one width over-covers one group and under-covers the other."""
    from anime_udf.intervals import LOCATION_FEATURES, Calibration, log_scale
    from training.calibration import fit_scale

    rng = np.random.default_rng(0)

    def rows(n):
        features = np.zeros((n, len(SCALE_FEATURES)))
        features[:, 0] = 1
        unknown = rng.random(n) < 0.3
        features[:, SCALE_FEATURES.index("unknown_studio")] = unknown
        errors = np.abs(rng.normal(0, np.where(unknown, 0.9, 0.3)))
        return features, errors, unknown

    features, errors, _ = rows(4000)
    weights = fit_scale(features, errors)
    centre = float(np.mean(features @ weights))
    scores = errors / np.exp(log_scale(weights, features, centre))
    calibration = Calibration(np.sort(scores), np.sort(errors), weights, np.zeros(LOCATION_FEATURES), centre)
    new, new_errors, unknown = rows(20000)
    lo, hi = calibration.bounds(np.full(len(new), 5.0), new, np.full(len(new), 0.9))
    inside = (5.0 - new_errors >= lo) & (5.0 + new_errors <= hi)  # errors on either side alike
    assert inside[unknown].mean() == pytest.approx(0.9, abs=0.015)
    assert inside[~unknown].mean() == pytest.approx(0.9, abs=0.015)
    constant = new_errors <= calibration.constant_half_width(0.9)
    assert constant[unknown].mean() < 0.8 and constant[~unknown].mean() > 0.97


def test_interval_macros_compute_coverage_width_and_the_interval_score():
    con = duckdb.connect()
    load_metric_macros(con)
    con.execute("CREATE TABLE t AS SELECT * FROM (VALUES ('a', 5.0, 4.0, 6.0), ('a', 7.0, 4.0, 6.0), "
                "('b', 1.0, 2.0, 3.0)) v(model, y, lo, hi)")
    # a: widths 2, 2; the second misses by 1: 2 + 2 / 0.1 x 1 = 22. b: 1 + 20 x 1 = 21.
    assert con.sql("SELECT * FROM interval_metrics('t', 0.9)").fetchall() == [
        ("a", 2, 0.5, 2.0, pytest.approx(12.0)), ("b", 1, 0.0, 1.0, pytest.approx(21.0))]


def test_eval_level_prints_coverage_width_and_score_beside_the_constant_width(baseline_bundle, fusion_bundle):
    args = ["eval", "--data", str(HOLDOUT), "--model", str(baseline_bundle), "--model", str(fusion_bundle),
            "--level", "0.8"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "prediction intervals at level 0.8" in result.output
    for label in ("baseline", "baseline constant width", "fusion", "fusion constant width"):
        assert f"│ {label} " in result.output
    as_json = CliRunner().invoke(cli, [*args, "--json"])
    figures = {row["model"]: row["interval"] for row in json.loads(as_json.output)}
    for kind in ("baseline", "fusion"):
        assert figures[kind]["level"] == 0.8 and 0 <= figures[kind]["coverage"] <= 1
        assert figures[kind]["interval_score"] >= figures[kind]["mean_width"] > 0
        assert figures[kind]["constant_width"]["mean_width"] > 0
    assert "--level" in CliRunner().invoke(cli, ["eval", "--help"]).output
    bad = CliRunner().invoke(cli, [*args[:-1], "1.2"])
    assert bad.exit_code == 2 and "--level" in bad.output


def test_the_centre_shifts_where_the_errors_lean_and_still_holds_the_score():
    """Titles scored low turn out better than their score, those scored high worse (y - ŷ leans
    on the score): the shift m(x) centres each band's interval on its errors, so both ends of the
    score are covered at the level, where an interval centred on the score under-covers them."""
    from anime_udf.intervals import LOCATION_FEATURES, Calibration, log_scale
    from training.calibration import fit_location, fit_scale

    rng = np.random.default_rng(1)

    def rows(n):
        z = rng.normal(size=n)  # the standardised score
        features = np.zeros((n, len(SCALE_FEATURES)))
        features[:, 0], features[:, 1], features[:, 2] = 1, z, z ** 2
        return features, -0.4 * z + rng.normal(0, 0.3, n), z  # residuals y - ŷ lean against the score

    features, residuals, _ = rows(4000)
    location = fit_location(features, residuals)
    assert location[1] == pytest.approx(-0.4, abs=0.03) and abs(location[2]) < 0.03
    shifted = residuals - features[:, :LOCATION_FEATURES] @ location
    weights = fit_scale(features, np.abs(shifted))
    centre = float(np.mean(features @ weights))
    scores = np.sort(np.abs(shifted) / np.exp(log_scale(weights, features, centre)))
    new, new_residuals, z = rows(20000)
    score = np.full(len(new), 5.0)
    level = np.full(len(new), 0.9)
    ends = np.abs(z) > 1
    for shift, covers in ((location, True), (np.zeros(LOCATION_FEATURES), False)):
        lo, hi = Calibration(scores, np.sort(np.abs(residuals)), weights, shift, centre).bounds(score, new, level)
        assert ((lo <= score) & (score <= hi)).all()
        inside = (score + new_residuals >= lo) & (score + new_residuals <= hi)
        if covers:  # the ends at least at the level (where the shift outgrows the half width, the
            # interval is widened to hold the score, and covers more)
            assert inside[ends].mean() > 0.88
            assert inside[~ends].mean() == pytest.approx(0.9, abs=0.02)
        else:
            assert inside[ends].mean() < 0.85
    # A shift beyond the half width still leaves the score inside: the interval is widened to it.
    far = Calibration(scores, scores, weights, np.array([3.0, 0.0, 0.0]), centre)
    lo, hi = far.bounds(score[:10], new[:10], np.full(10, 0.5))
    assert (lo == score[:10]).all() and (hi > score[:10] + 3.0 - 1e-9).all()


def test_the_word_count_is_str_split_of_the_synopsis_as_given():
    """The scale model's word count reads the cleaned synopsis (one space between words, so no
    split is needed): it must equal len(str(s).split()) of the synopsis as given, for any text."""
    from anime_udf.features import clean_text
    from anime_udf.intervals import word_counts

    texts = [None, "", " ", "one", " one ", "two  words", "a\tb\nc\r\x0bd\x0ce\x1cf\x1fg", "a\xa0b\u3000c\u2003d",
             "x\x85y", "日本語 テキスト", 12.5, "  \n ", "trailing ", *read_catalog(CATALOG)["synopsis"].to_list()]
    assert word_counts([clean_text(t) for t in texts]).tolist() == [
        0 if t is None else len(str(t).split()) for t in texts]
