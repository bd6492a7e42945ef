"""Each command through click's CliRunner, as a user would type it."""

import json
import shutil

import polars as pl
import pytest
from click.testing import CliRunner

from anime_udf.bundle import read_manifest
from anime_udf.cli import cli
from tests.conftest import CATALOG, HOLDOUT


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture
def models(baseline_bundle, tmp_path):
    shutil.copytree(baseline_bundle, tmp_path / "models" / "baseline-fixture")
    return tmp_path / "models"


def test_train_baseline_writes_a_bundle_that_beats_the_mean(tmp_path):
    result = run("train", "baseline", "--data", CATALOG, "--epochs", "25", "--out", tmp_path / "models" / "b")
    assert result.exit_code == 0, result.output
    assert "validation (selection run): n=80" in result.output
    assert (tmp_path / "models" / "b" / "manifest.json").is_file()
    evaluated = run("eval", "--data", HOLDOUT, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    [row] = json.loads(evaluated.output)
    holdout = pl.read_csv(HOLDOUT)["score"]
    train_mean = pl.read_csv(CATALOG)["score"].mean()
    mean_mae = (holdout - train_mean).abs().mean()
    assert row["model"] == "baseline" and row["n"] == holdout.len()
    assert row["mae"] < 0.7 * mean_mae  # it learned from genres, studio, episodes and words
    assert row["spearman"] > 0.6


def test_models_lists_bundles(models):
    result = run("models")
    assert result.exit_code == 0
    assert "baseline" in result.output and "baseline-fixture" in result.output and "mae=" in result.output
    listed = json.loads(run("models", "--json").output)
    assert listed[0]["kind"] == "baseline" and listed[0]["valid_mae"] > 0


def test_models_without_bundles_says_what_to_run():
    assert "anime-udf train baseline" in run("models").output


def test_sql_prints_and_writes(models, tmp_path):
    query = "SELECT anime_id, predict_score(synopsis, genres, studio, episodes) AS p FROM anime ORDER BY anime_id"
    printed = run("sql", query, "--table", f"anime={HOLDOUT}", "--limit", "3")
    assert printed.exit_code == 0, printed.output
    assert "10001" in printed.output and "10004" not in printed.output
    for suffix in ("parquet", "csv"):
        out = tmp_path / f"scores.{suffix}"
        written = run("sql", query, "--table", f"anime={HOLDOUT}", "--out", out)
        assert written.exit_code == 0, written.output
        df = pl.read_parquet(out) if suffix == "parquet" else pl.read_csv(out)
        assert df.height == 120 and df["p"].is_between(1, 10).all()


def test_eval_prints_metrics_from_sql(models):
    result = run("eval", "--data", HOLDOUT, "--where", "anime_id % 2 = 0")
    assert result.exit_code == 0, result.output
    for name in ("mae", "rmse", "spearman", "r2", "baseline", "60"):
        assert name in result.output


def test_score_command_adds_a_column(models, tmp_path):
    result = run("score", "--data", HOLDOUT, "--out", tmp_path / "s.parquet")
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(tmp_path / "s.parquet")
    assert df.columns[-1] == "predict_score" and df.height == 120


def test_explain_prints_and_writes_the_parts_of_the_selected_rows(models, tmp_path):
    printed = run("explain", "--data", HOLDOUT, "--where", "anime_id IN (10002, 10005)")
    assert printed.exit_code == 0, printed.output
    header = next(line for line in printed.output.splitlines() if "synopsis" in line)
    assert [c.strip() for c in header.strip("│").split("┆")] == [
        "model", "row", "anime_id", "title", "base", "synopsis", "genres", "studio", "episodes", "unclamped", "score"]
    assert "10002" in printed.output and "10005" in printed.output and "10001" not in printed.output
    assert "base + parts = unclamped" in printed.output
    out = tmp_path / "parts.csv"
    written = run("explain", "--data", HOLDOUT, "--out", out)
    assert written.exit_code == 0 and "wrote the parts of 120 scores" in written.output
    parts = pl.read_csv(out)
    total = parts["base"] + parts["synopsis"] + parts["genres"] + parts["studio"] + parts["episodes"]
    assert (total - parts["unclamped"]).abs().max() <= 1e-5
    scored = run("score", "--data", HOLDOUT, "--out", tmp_path / "s.parquet")
    assert scored.exit_code == 0, scored.output
    scores = pl.read_parquet(tmp_path / "s.parquet")["predict_score"].to_numpy()
    assert abs(parts.sort("row")["score"].to_numpy() - scores).max() <= 1e-5
    empty = run("explain", "--data", HOLDOUT, "--where", "anime_id < 0")
    assert empty.exit_code == 1 and "nothing to explain" in empty.output
    bad = run("explain", "--data", HOLDOUT, "--out", tmp_path / "parts.txt")
    assert bad.exit_code == 2 and "use a .parquet or .csv file name" in bad.output


def test_bad_input_errors_name_column_and_value(models, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("synopsis,genres,studio,episodes,score\nA tale,Drama,X,twelve,7.1\n")
    result = run("eval", "--data", bad)
    assert result.exit_code == 1
    assert "'episodes'" in result.output and "'twelve'" in result.output
    bad.write_text("synopsis,genres,studio,score\nA tale,Drama,X,7.1\n")
    result = run("train", "baseline", "--data", bad)
    assert result.exit_code == 1 and "missing column(s) episodes" in result.output
    bad.write_text("synopsis,genres,studio,episodes,score\nA tale,Drama,X,12,11.5\n")
    result = run("eval", "--data", bad)
    assert result.exit_code == 1 and "'score'" in result.output and "11.5" in result.output


def test_unknown_model_and_missing_models_are_clear(models, tmp_path):
    result = run("eval", "--data", HOLDOUT, "--model", "nope")
    assert result.exit_code == 1 and "unknown model 'nope'" in result.output and "baseline-fixture" in result.output
    result = run("score", "--data", HOLDOUT, "--out", "s.parquet", "--models", tmp_path / "empty")
    assert result.exit_code == 1 and "no model bundles" in result.output


def test_help_explains_every_command():
    for args in ([], ["train"], ["train", "baseline"], ["train", "fusion"], ["sql"], ["eval"], ["explain"],
                 ["models"]):
        result = run(*args, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output


def test_second_training_run_reuses_cached_embeddings(baseline_bundle, warm_cache, tmp_path, monkeypatch):
    from anime_udf.text import FrozenTextEncoder

    def no_encoding(self, texts, progress):
        raise AssertionError(f"encoded {len(texts)} texts again")

    monkeypatch.setattr(FrozenTextEncoder, "_encode", no_encoding)  # the session bundle filled the cache
    result = run("train", "baseline", "--data", CATALOG, "--epochs", "3", "--out", tmp_path / "again")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("where", ["anime_id > 0 UNION ALL SELECT 'baseline', 1, 1",
                                   "anime_id > 0; COPY (SELECT 1) TO 'written.csv'",
                                   "1=1) UNION ALL (SELECT 'baseline', 1.0, 1.0"])
def test_eval_where_is_one_expression(models, where, tmp_path):
    result = run("eval", "--data", HOLDOUT, "--where", where)
    assert result.exit_code == 2 and "is not one SQL expression" in result.output
    assert not (tmp_path / "written.csv").exists()


def test_eval_where_comment_cannot_drop_a_model_and_no_file_is_read(models, fusion_bundle):
    shutil.copytree(fusion_bundle, models / "fusion-fixture")
    both = json.loads(run("eval", "--data", HOLDOUT, "--where", "anime_id % 2 = 0 --", "--json").output)
    even = int((pl.read_csv(HOLDOUT)["anime_id"] % 2 == 0).sum())
    assert [(r["model"], r["n"]) for r in both] == [("baseline", even), ("fusion", even)]
    result = run("eval", "--data", HOLDOUT, "--where", f"anime_id IN (SELECT 1 FROM read_csv('{CATALOG}'))")
    assert result.exit_code == 1 and "file system operations are disabled" in result.output


@pytest.mark.parametrize("args, message", [
    (["baseline", "--epochs", "0"], "--epochs"),
    (["baseline", "--batch-size", "0"], "--batch-size"),
    (["baseline", "--lr", "nan"], "--lr"),
    (["fusion", "--lr-head", "-1"], "--lr-head"),
])
def test_train_refuses_impossible_settings_before_reading_data(args, message):
    result = run("train", *args, "--data", CATALOG)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_train_with_a_header_only_validation_catalog_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("synopsis,genres,studio,episodes,score\n")
    result = run("train", "baseline", "--data", CATALOG, "--valid", empty)
    assert result.exit_code == 1 and "empty.csv: no rows to validate on" in result.output


def test_an_unexpected_error_is_one_line_unless_debug(monkeypatch):
    import anime_udf.registry

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(anime_udf.registry, "list_bundles", broken)
    result = run("models")
    assert result.exit_code == 1
    assert result.output.strip() == "Error: ZeroDivisionError: boom (rerun with --debug for the traceback)"
    with pytest.raises(ZeroDivisionError):
        run("--debug", "models")


def test_models_lists_corrupt_and_malformed_bundles_as_broken_and_the_rest(models, baseline_bundle):
    corrupt = shutil.copytree(baseline_bundle, models / "corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    odd = shutil.copytree(baseline_bundle, models / "odd-metrics")
    manifest = json.loads((odd / "manifest.json").read_text())
    manifest["metrics"] = []
    (odd / "manifest.json").write_text(json.dumps(manifest))
    result = run("models")
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines()}
    assert lines["corrupt"].startswith("broken") and "checksum mismatch" in lines["corrupt"]
    assert lines["odd-metrics"].startswith("baseline") and "mae=" not in lines["odd-metrics"]
    assert lines["baseline-fixture"].startswith("baseline") and "mae=" in lines["baseline-fixture"]


def test_sql_refuses_a_repeated_view_name_and_score_a_bad_out_before_scoring(models, monkeypatch):
    import anime_udf.scoring

    monkeypatch.setattr(anime_udf.scoring, "load_scorer", lambda *a, **k: pytest.fail("loaded a model"))
    result = run("sql", "SELECT 1", "--table", f"anime={CATALOG}", "--table", f"ANIME={HOLDOUT}")
    assert result.exit_code == 2 and "given more than once: anime" in result.output
    result = run("score", "--data", HOLDOUT, "--out", "scores.txt")
    assert result.exit_code == 2 and "use a .parquet or .csv file name" in result.output


def test_a_bad_option_the_library_finds_reads_as_clicks_own():
    """An OptionError (sql's --write without --db) is said as click says a bad option: under the
    command's usage, naming the option, exit 2."""
    result = run("sql", "--write", "SELECT 1")
    assert result.exit_code == 2
    assert "sql [OPTIONS] QUERY" in result.output and "Try 'cli sql --help' for help." in result.output
    assert "Error: Invalid value for --write: --write opens the --db database for writing" in result.output


def test_constant_scores_give_strict_json_and_no_progress_bars_in_a_log(tmp_path):
    catalog = tmp_path / "constant.csv"
    pl.read_csv(CATALOG).with_columns(score=pl.lit(7.0)).write_csv(catalog)
    result = run("train", "baseline", "--data", catalog, "--epochs", "4", "--seeds", "1", "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert "epoch/s" not in result.output and "it/s" not in result.output  # not a terminal: no bars
    text = (tmp_path / "b" / "manifest.json").read_text()
    manifest = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the manifest: not JSON"))
    assert manifest["metrics"]["valid"]["spearman"] is None  # undefined for a constant target


def test_ctrl_c_before_fine_tuning_does_not_claim_a_checkpoint(tmp_path, monkeypatch):
    import training.fusion

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.fusion, "select_epochs", interrupted)
    result = run("train", "fusion", "--data", CATALOG, "--epochs", "1", "--out", tmp_path / "f")
    assert result.exit_code == 1
    assert "interrupted before fine-tuning began: nothing was saved" in result.output
    assert "--resume" not in result.output


def test_train_out_never_replaces_what_is_not_a_bundle_of_its_kind(models, fusion_bundle, tmp_path, monkeypatch):
    import training.baseline

    monkeypatch.setattr(training.baseline, "FrozenTextEncoder", lambda *a, **k: pytest.fail("training started"))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    shutil.copytree(fusion_bundle, models / "fusion-x")
    for out, force, message in [
        (precious, "--force", "precious: already exists and is not a complete model bundle"),
        (models, "--force", "models: already exists and is not a complete model bundle"),
        (models / "fusion-x", "--force", "fusion-x: holds a fusion bundle, which a baseline bundle never replaces"),
        (models / "baseline-fixture", "--seed=42", "baseline-fixture: a baseline bundle is already there; "
                                                   "pass --force to replace it"),
    ]:
        result = run("train", "baseline", "--data", CATALOG, "--out", out, force)
        assert result.exit_code == 1 and message in result.output, result.output
    assert (precious / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in models.iterdir()) == ["baseline-fixture", "fusion-x"]
    assert read_manifest(models / "fusion-x")["kind"] == "fusion"


def test_train_force_replaces_a_bundle_of_its_kind(models):
    before = read_manifest(models / "baseline-fixture")
    result = run("train", "baseline", "--data", CATALOG, "--epochs", "2", "--seeds", "1",
                 "--out", models / "baseline-fixture", "--force")
    assert result.exit_code == 0, result.output
    after = read_manifest(models / "baseline-fixture")
    assert after["model"]["seeds"] == 1 != before["model"]["seeds"]
    assert [p.name for p in models.iterdir()] == ["baseline-fixture"]  # nothing set aside is left


def test_sql_without_bundles_runs_a_query_that_needs_none(tmp_path):
    result = run("sql", "SELECT 42 AS answer")
    assert result.exit_code == 0 and "42" in result.output, result.output
    called = run("sql", "SELECT predict_score('A story.', 'Drama', NULL, 12)")
    assert called.exit_code == 1
    assert f"predict_score: no baseline bundle in {tmp_path / 'models'}" in called.output


def test_score_replaces_the_score_columns_the_input_already_has(models, tmp_path):
    scored = tmp_path / "scored.parquet"
    pl.read_csv(HOLDOUT).with_columns(predict_score=pl.lit(-1.0)).write_parquet(scored)  # an older model's
    result = run("score", "--data", scored, "--out", tmp_path / "new.parquet")
    assert result.exit_code == 0, result.output
    assert "replaced the input's predict_score column" in result.output
    df = pl.read_parquet(tmp_path / "new.parquet")
    assert df.columns == [*pl.read_csv(HOLDOUT).columns, "predict_score"]
    assert df["predict_score"].min() >= 1.0
    assert "is replaced" in run("score", "--help").output


def test_score_refuses_its_input_or_a_directory_as_out_before_scoring(models, tmp_path, monkeypatch):
    import anime_udf.scoring

    monkeypatch.setattr(anime_udf.scoring, "load_scorer", lambda *a, **k: pytest.fail("loaded a model"))
    data = tmp_path / "catalog.csv"
    shutil.copy(HOLDOUT, data)
    (tmp_path / "link.csv").symlink_to(data)
    for out in (data, tmp_path / "link.csv"):
        result = run("score", "--data", data, "--out", out)
        assert result.exit_code == 2 and f"{out} is the --data file {data}" in result.output, result.output
    assert data.read_bytes() == HOLDOUT.read_bytes()
    (tmp_path / "dir.parquet").mkdir()
    result = run("score", "--data", data, "--out", tmp_path / "dir.parquet")
    assert result.exit_code == 2 and "dir.parquet: a directory" in result.output, result.output


def test_score_gives_back_the_users_columns_value_for_value_and_type_for_type(models, tmp_path):
    """Only score columns are added: a DOUBLE episodes with huge, NaN and infinite counts stays
    DOUBLE with those values, genres stored as a LIST stays a LIST; the models read them by the
    NULL policy (NaN and ±inf missing, huge counts capped) all the same."""
    from polars.testing import assert_frame_equal

    odd = [1e30, 1e300, 9223372036854775807.0, 1.7e38, float("nan"), float("inf"), float("-inf"), 12.0]
    catalog = pl.read_csv(HOLDOUT).head(len(odd)).with_columns(episodes=pl.Series(odd),
                                                               genres=pl.col("genres").str.split(","))
    catalog.write_parquet(tmp_path / "odd.parquet")
    result = run("score", "--data", tmp_path / "odd.parquet", "--out", tmp_path / "scored.parquet")
    assert result.exit_code == 0, result.output
    scored = pl.read_parquet(tmp_path / "scored.parquet")
    assert_frame_equal(scored.drop("predict_score"), catalog)  # NaN equals NaN here
    assert scored["predict_score"].is_between(1, 10).all()

    as_csv = run("score", "--data", HOLDOUT, "--out", tmp_path / "scored.csv")
    assert as_csv.exit_code == 0, as_csv.output
    assert pl.read_csv(tmp_path / "scored.csv").drop("predict_score").equals(pl.read_csv(HOLDOUT))


def test_sql_table_views_hold_the_users_values(models, tmp_path):
    pl.DataFrame({"anime_id": [1, 2], "synopsis": ["a", None], "genres": ["Action", None], "studio": [None, "X"],
                  "episodes": [1e30, float("nan")]}).write_parquet(tmp_path / "odd.parquet")
    result = run("sql", "--table", f"anime={tmp_path / 'odd.parquet'}", "--out", tmp_path / "out.parquet",
                 "SELECT *, predict_score(synopsis, genres, studio, episodes) AS p FROM anime")
    assert result.exit_code == 0, result.output
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out.schema["episodes"] == pl.Float64 and out["episodes"][0] == 1e30 and out["episodes"].is_nan()[1]
    assert out["p"].is_between(1, 10).all()


def test_score_names_an_earlier_runs_score_column_it_keeps(models, tmp_path):
    """A fusion score column of an earlier run passes through a baseline-only run as the user's
    data, and the output line says so, whatever its case."""
    pl.read_csv(HOLDOUT).with_columns(PREDICT_SCORE_FUSION=pl.lit(3.0)).write_parquet(tmp_path / "in.parquet")
    result = run("score", "--data", tmp_path / "in.parquet", "--out", tmp_path / "out.parquet")
    assert result.exit_code == 0, result.output
    assert "kept the input's PREDICT_SCORE_FUSION column as it was (not scored by this run)" in result.output
    assert pl.read_parquet(tmp_path / "out.parquet")["PREDICT_SCORE_FUSION"].unique().to_list() == [3.0]


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1e3", "16.0"])
@pytest.mark.parametrize("command", [["eval", "--data", HOLDOUT], ["score", "--data", HOLDOUT, "--out", "s.csv"],
                                     ["explain", "--data", HOLDOUT], ["sql", "SELECT 1"],
                                     ["train", "baseline", "--data", CATALOG]])
def test_a_bad_encoder_batch_is_one_line_before_any_work(models, monkeypatch, command, value):
    import anime_udf.scoring

    monkeypatch.setattr(anime_udf.scoring, "load_scorer", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setenv("ANIME_UDF_ENCODER_BATCH", value)
    result = run(*command)
    assert result.exit_code == 1
    assert result.output == f"Error: $ANIME_UDF_ENCODER_BATCH is {value!r}: expected a whole number of texts, at least 1\n"


def test_eval_shows_an_undefined_spearman_as_undefined(models):
    """The training mean predicts one value: its Spearman is undefined, a dash, never NaN."""
    result = run("eval", "--data", HOLDOUT)
    assert result.exit_code == 0, result.output
    [mean_row] = [line for line in result.output.splitlines() if line.startswith("│ training mean")]
    assert "—" in mean_row and "NaN" not in result.output and "nan" not in result.output
