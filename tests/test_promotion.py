"""Promotion: the production alias of each kind, what every reader resolves, promote and roll back."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

import anime_udf
from anime_udf.cli import cli
from anime_udf.registry import ALIASES_FILE, AliasError, read_aliases, resolve, set_production
from anime_udf.rescore.bundles import resolve_models
from tests.conftest import CATALOG, FP32_TOLERANCE, HOLDOUT

QUERY = "SELECT anime_id, predict_score(synopsis, genres, studio, episodes) AS p FROM anime ORDER BY anime_id"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def other_baseline(tmp_path_factory, session_cache) -> Path:
    """A second baseline, trained differently and on the catalog's first 300 rows only."""
    from anime_udf.cache import EmbeddingCache
    from training.baseline import BaselineSettings, train_baseline
    from training.common import load_split

    directory = tmp_path_factory.mktemp("bundles")
    first_rows = directory / "first-300.csv"
    pl.read_csv(CATALOG).head(300).write_csv(first_rows)
    out = directory / "baseline-other"
    train_baseline(load_split(first_rows), out, BaselineSettings(epochs=4, seeds=1, seed=7),
                   cache=EmbeddingCache(session_cache / "embeddings.sqlite"), progress=False, log=lambda _: None)
    return out


@pytest.fixture
def models(baseline_bundle, other_baseline, tmp_path) -> Path:
    """Two baselines: ``baseline-old``, and ``baseline-new``, the newest, which serves while none is promoted."""
    root = tmp_path / "models"
    shutil.copytree(baseline_bundle, root / "baseline-old")
    shutil.copytree(other_baseline, root / "baseline-new")
    for name, created in (("baseline-old", "2026-01-01T00:00:00+00:00"), ("baseline-new", "2026-02-01T00:00:00+00:00")):
        manifest_path = root / name / "manifest.json"  # created_at is descriptive: not checksummed
        manifest = json.loads(manifest_path.read_text())
        manifest_path.write_text(json.dumps({**manifest, "created_at": created}))
    return root


def sql_scores(*args) -> list[float]:
    result = run("sql", QUERY, "--table", f"anime={HOLDOUT}", "--limit", "200", "--out", "p.parquet", *args)
    assert result.exit_code == 0, result.output
    return pl.read_parquet("p.parquet")["p"].to_list()


def test_without_aliases_the_newest_serves_as_before(models):
    assert not (models / ALIASES_FILE).exists()
    assert resolve("baseline") == models / "baseline-new"
    new, old = sql_scores("--model", "baseline-new"), sql_scores("--model", "baseline-old")
    assert sql_scores() == new and min(abs(a - b) for a, b in zip(new, old)) > 0.001  # two models, told apart
    listed = {r["name"]: r["serves"] for r in json.loads(run("models", "--json").output)}
    assert listed == {"baseline-old": None, "baseline-new": "newest"}
    assert not (models / ALIASES_FILE).exists()  # reading never writes one


def test_every_reader_follows_the_production_alias(models, tmp_path):
    promoted = run("promote", "baseline-old")
    assert promoted.exit_code == 0, promoted.output
    assert promoted.output == "baseline production: unset (the newest serves: baseline-new) -> baseline-old\n"
    old = sql_scores("--model", "baseline-old")
    assert sql_scores() == old  # sql
    assert run("score", "--data", HOLDOUT, "--out", "s.parquet").exit_code == 0  # score
    assert pl.read_parquet("s.parquet").sort("anime_id")["predict_score"].to_list() == old
    [row] = json.loads(run("eval", "--data", HOLDOUT, "--json").output)  # eval
    explicit = json.loads(run("eval", "--data", HOLDOUT, "--json", "--model", "baseline-old").output)
    assert row == pytest.approx(explicit[0], abs=1e-12)  # the same scores, summed in any order
    explained = run("explain", "--data", HOLDOUT, "--where", "anime_id = 10001", "--out", "e.csv")  # explain
    assert explained.exit_code == 0, explained.output
    assert pl.read_csv("e.csv")["score"][0] == pytest.approx(old[0], abs=FP32_TOLERANCE)  # heads one by one
    # register (DuckDB, and through register_bundles the dbt plugin and Spark), rescore, get_model
    assert anime_udf.register(duckdb.connect())["predict_score"].path == models / "baseline-old"
    assert [c.path for c in resolve_models("all")] == [c.path for c in resolve_models("baseline")] \
        == [models / "baseline-old"]
    assert anime_udf.get_model("baseline") == models / "baseline-old"
    listed = {r["name"]: r["serves"] for r in json.loads(run("models", "--json").output)}
    assert listed == {"baseline-old": "production", "baseline-new": None}
    assert "production" in run("models").output


def test_the_dbt_plugin_and_spark_registration_follow_the_alias(models):
    from anime_udf.udf import bundles_to_register  # Spark's register, as DuckDB's, registers these

    pytest.importorskip("dbt.adapters.duckdb")
    from dbt.adapters.duckdb.plugins import BasePlugin

    assert run("promote", "baseline-old").exit_code == 0
    assert bundles_to_register(None, None, models) == [models / "baseline-old"]
    plugin = BasePlugin.create("anime_udf.dbt", config={"models": str(models)})
    assert [scorer.path for scorer in plugin.scorers] == [models / "baseline-old"]


def test_an_open_connection_keeps_its_bundle_until_registered_again(models):
    con = duckdb.connect()
    anime_udf.register(con)
    con.execute(f"CREATE VIEW anime AS FROM read_csv('{HOLDOUT}')")
    before = con.sql(QUERY).pl()["p"].to_list()
    assert run("promote", "baseline-old").exit_code == 0
    assert con.sql(QUERY).pl()["p"].to_list() == before  # resolved when registered, not at each call
    anime_udf.register(con)  # registering again replaces the functions with the promoted bundle's
    assert con.sql(QUERY).pl()["p"].to_list() == sql_scores("--model", "baseline-old") != before


def test_rollback_undoes_promotions_last_first(models):
    assert run("promote", "baseline-old").exit_code == 0
    assert run("promote", "baseline-new").output == "baseline production: baseline-old -> baseline-new\n"
    assert run("promote", "baseline-new").output == "baseline production: baseline-new (unchanged)\n"
    back = run("promote", "--rollback", "baseline")
    assert back.exit_code == 0 and back.output == "baseline production: baseline-new -> baseline-old\n"
    assert resolve("baseline") == models / "baseline-old"
    back = run("promote", "--rollback", "baseline")
    assert back.output == "baseline production: baseline-old -> unset (the newest serves: baseline-new)\n"
    assert read_aliases().production == {}
    nothing = run("promote", "--rollback", "baseline")
    assert nothing.exit_code == 1 and "no promotion of baseline to roll back" in nothing.output
    history = read_aliases().history
    assert [(e["action"], e["from"], e["to"]) for e in history] == [
        ("promote", None, "baseline-old"), ("promote", "baseline-old", "baseline-new"),
        ("rollback", "baseline-new", "baseline-old"), ("rollback", "baseline-old", None)]


def test_promote_refuses_what_it_cannot_serve(models, tmp_path):
    broken = shutil.copytree(models / "baseline-old", models / "baseline-broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    outside = shutil.copytree(models / "baseline-old", tmp_path / "elsewhere")
    for args, says in ((["baseline-broken"], "checksum mismatch"), ([outside], "not in the models directory"),
                       (["nothing-here"], "unknown model 'nothing-here'"), ([], "name a BUNDLE"),
                       (["baseline-old", "--rollback", "baseline"], "name a BUNDLE")):
        result = run("promote", *args)
        assert result.exit_code != 0 and says in result.output, result.output
    assert not (models / ALIASES_FILE).exists()  # nothing changed


def test_an_alias_pointing_nowhere_is_an_error_not_the_newest(models):
    assert run("promote", "baseline-old").exit_code == 0
    shutil.rmtree(models / "baseline-old")
    for args in (["sql", QUERY, "--table", f"anime={HOLDOUT}"], ["eval", "--data", HOLDOUT], ["models"]):
        result = run(*args)
        assert result.exit_code == 1, result.output
        assert "the production alias of baseline names 'baseline-old', which is not a bundle" in result.output
    assert run("promote", "--rollback", "baseline").exit_code == 0  # the way out
    assert resolve("baseline") == models / "baseline-new"


def test_an_alias_naming_a_bundle_of_another_kind_is_refused(models, fusion_bundle):
    shutil.copytree(fusion_bundle, models / "fusion-a")
    assert run("promote", "baseline-old").exit_code == 0 and run("promote", "baseline-new").exit_code == 0
    shutil.rmtree(models / "baseline-old")  # what the rollback would serve again is now a fusion bundle
    shutil.copytree(fusion_bundle, models / "baseline-old")
    back = run("promote", "--rollback", "baseline")
    assert back.exit_code == 1 and "names baseline-old, a fusion bundle" in back.output, back.output
    assert read_aliases().production == {"baseline": "baseline-new"} and len(read_aliases().history) == 2
    aliases = json.loads((models / ALIASES_FILE).read_text())  # edited by hand
    aliases["aliases"]["production"]["baseline"] = "fusion-a"
    (models / ALIASES_FILE).write_text(json.dumps(aliases))
    for args in (["sql", QUERY, "--table", f"anime={HOLDOUT}"], ["models"]):
        result = run(*args)
        assert result.exit_code == 1 and "the production alias of baseline names fusion-a, a fusion bundle" \
            in result.output, result.output


def test_an_unreadable_aliases_file_is_an_error_naming_it(models):
    (models / ALIASES_FILE).write_text('{"aliases": {"production": {"baseline": ')  # written by hand, cut short
    listed = run("models")
    assert listed.exit_code == 1 and "baseline-old" in listed.output and "baseline-new" in listed.output
    for result in (listed, run("sql", QUERY, "--table", f"anime={HOLDOUT}")):
        assert f"{models / ALIASES_FILE}: cannot read the aliases" in result.output


def test_models_shows_a_decision_edited_by_hand_without_failing(models):
    (models / ALIASES_FILE).write_text(json.dumps({"aliases": {"production": {}}, "history": [
        {"kind": "baseline", "challenger": "baseline-new", "comparison": {"metric": "rmse"}}]}))
    result = run("models")
    assert result.exit_code == 0, result.output
    assert '--promote-if-better (?): not promoted: {"metric": "rmse"}' in result.output


def test_a_promotion_that_moved_the_alias_is_never_undone_silently(models):
    assert run("promote", "baseline-old").exit_code == 0
    before = (models / ALIASES_FILE).read_bytes()
    with pytest.raises(AliasError, match="moved while this command checked it .was unset, now baseline-old."):
        set_production("baseline", "baseline-new", None, "promote")  # checked before the promotion above
    assert (models / ALIASES_FILE).read_bytes() == before


def test_two_bundles_of_one_kind_are_refused(models):
    for command in (["sql", QUERY, "--table", f"anime={HOLDOUT}"], ["eval", "--data", HOLDOUT],
                    ["score", "--data", HOLDOUT, "--out", "s.parquet"], ["explain", "--data", HOLDOUT]):
        result = run(*command, "--model", "baseline-old", "--model", "baseline-new")
        assert result.exit_code == 2, result.output
        [error] = [line for line in result.output.splitlines() if line.startswith("Error:")]  # one line says why
        assert "two baseline bundles" in error and "predict_score serves one" in error and "anime-udf compare" in error
    assert run("eval", "--data", HOLDOUT, "--model", "baseline-old", "--model", "baseline-old").exit_code == 0


def stored_scores(store: Path) -> list[float]:
    con = duckdb.connect(str(store), read_only=True)
    try:
        return [r[0] for r in con.sql("SELECT score FROM rescore_scores ORDER BY CAST(key AS INTEGER)").fetchall()]
    finally:
        con.close()


def test_rescore_follows_the_alias_and_its_record_names_bundle_and_alias(models):
    """A promotion rescores the kind's rows once with the promoted bundle; a rollback scores the old
    model's rows again (the store keeps one model of each kind) and says so; each record names both."""
    from anime_udf.rescore import format_summary, model_id, rescore

    store = Path("scores.duckdb")
    ids = {name: model_id(models / name) for name in ("baseline-old", "baseline-new")}

    def one_model(record) -> tuple:
        [m] = record.models
        return m["model_id"], m["bundle"], m["alias"], m["rows_scored"], m["rows_reused"], m["rows_superseded"]

    assert one_model(rescore(HOLDOUT, store)) == (ids["baseline-new"], str(models / "baseline-new"), "newest",
                                                  120, 0, 0)
    assert run("promote", "baseline-old").exit_code == 0
    planned = rescore(HOLDOUT, store, dry_run=True)
    assert one_model(planned) == (ids["baseline-old"], str(models / "baseline-old"), "production", 120, 0, 120)
    assert "replaces another baseline model's 120 rows" in format_summary(planned)
    promoted = run("rescore", "--catalog", HOLDOUT, "--store", store)
    assert promoted.exit_code == 0, promoted.output
    assert f"bundle {models / 'baseline-old'} (the production alias); replaced another baseline model's 120 rows" \
        in promoted.output
    assert stored_scores(store) == pytest.approx(sql_scores("--model", "baseline-old"), abs=FP32_TOLERANCE)
    again = rescore(HOLDOUT, store)  # rescored once: the next run reuses every row
    assert one_model(again) == (ids["baseline-old"], str(models / "baseline-old"), "production", 0, 120, 0)
    assert run("promote", "--rollback", "baseline").exit_code == 0
    back = json.loads(run("rescore", "--catalog", HOLDOUT, "--store", store, "--json").output)
    [m] = back["models"]
    assert (m["model_id"], m["alias"], m["rows_scored"], m["rows_superseded"], m["prev_model_id"]) == (
        ids["baseline-new"], "newest", 120, 120, ids["baseline-old"])
    assert stored_scores(store) == pytest.approx(sql_scores("--model", "baseline-new"), abs=FP32_TOLERANCE)
    named = rescore(HOLDOUT, store, models="baseline-new")
    assert one_model(named) == (ids["baseline-new"], str(models / "baseline-new"), None, 0, 120, 0)
    assert "(named by --model)" in format_summary(named)
    con = duckdb.connect(str(store), read_only=True)  # the table keeps the bundle and alias of every run
    assert con.sql("SELECT bundle, alias FROM rescore_runs ORDER BY started_at").fetchall() == [
        (str(models / b), alias) for b, alias in (("baseline-new", "newest"), ("baseline-old", "production"),
                                                  ("baseline-old", "production"), ("baseline-new", "newest"),
                                                  ("baseline-new", None))]
    con.close()


# --- killed and concurrent promotions ---------------------------------------------------------------


def promote_process(args: list[str], stderr_path: Path, **env) -> subprocess.Popen:
    command = [sys.executable, "-c", "from anime_udf.cli import cli; cli()", "promote", *args]
    with open(stderr_path, "w") as err:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **env})


def wait_for(proc: subprocess.Popen, stderr_path: Path, marker: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while marker not in stderr_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {marker!r}:\n{stderr_path.read_text()}")
        time.sleep(0.05)


@pytest.mark.slow  # kills fresh CLI processes
@pytest.mark.parametrize("phase", ["locked", "written"])
def test_a_promotion_killed_mid_write_leaves_the_old_aliases(models, tmp_path, phase):
    assert run("promote", "baseline-old").exit_code == 0
    before = (models / ALIASES_FILE).read_bytes()
    err = tmp_path / "stderr.txt"
    proc = promote_process(["baseline-new"], err, ANIME_UDF_ALIASES_PAUSE_AT=phase)
    wait_for(proc, err, f"promote: paused at {phase}")
    if phase == "written":  # the new file is complete beside the old one, not yet renamed over it
        assert json.loads((models / f".{ALIASES_FILE}.tmp").read_text())["aliases"]["production"] == {
            "baseline": "baseline-new"}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (models / ALIASES_FILE).read_bytes() == before
    assert resolve("baseline") == models / "baseline-old"
    # The kernel released the dead writer's lock: the next promotion goes through, and its file is whole.
    again = run("promote", "baseline-new")
    assert again.exit_code == 0, again.output
    assert [e["to"] for e in read_aliases().history] == ["baseline-old", "baseline-new"]


@pytest.mark.slow  # fresh CLI processes
def test_two_promotions_at_once_leave_one_recorded_and_refuse_the_other(models, tmp_path):
    """The first holds the lock (paused) after both have checked the alias; the second then finds
    it moved and changes nothing: one promotion, recorded, and one clear refusal."""
    first_err, second_err = tmp_path / "first.txt", tmp_path / "second.txt"
    first = promote_process(["baseline-old"], first_err, ANIME_UDF_ALIASES_PAUSE_AT="locked",
                            ANIME_UDF_ALIASES_PAUSE_SECONDS="8")
    wait_for(first, first_err, "paused at locked")
    second = promote_process(["baseline-new"], second_err)  # checks now, then waits for the lock
    assert first.wait(60) == 0 and second.wait(60) == 1
    assert "moved while this command checked it (was unset, now baseline-old)" in second_err.read_text()
    assert read_aliases().production == {"baseline": "baseline-old"}
    assert [(e["from"], e["to"]) for e in read_aliases().history] == [(None, "baseline-old")]


@pytest.mark.slow  # fresh CLI processes
def test_concurrent_promotions_of_both_kinds_are_both_recorded(models, fusion_bundle):
    shutil.copytree(fusion_bundle, models / "fusion-a")
    procs = [promote_process([name], models.parent / f"{name}.txt") for name in ("baseline-old", "fusion-a")]
    assert [p.wait(120) for p in procs] == [0, 0]
    assert read_aliases().production == {"baseline": "baseline-old", "fusion": "fusion-a"}
    assert sorted(e["to"] for e in read_aliases().history) == ["baseline-old", "fusion-a"]


# --- compare ------------------------------------------------------------------------------------------------


def test_bootstrap_figures_are_those_of_the_resampled_rows():
    """Each resample's differences, computed from counts per row, equal the figures of the rows drawn
    (ties, the repeats of a drawn row among them, ranked by their average rank)."""
    from scipy.stats import spearmanr

    from anime_udf.comparison import resampled_differences

    rng = np.random.default_rng(1)
    y = rng.integers(1, 20, 300) / 2.0  # many ties
    a, b = y + rng.normal(0, 1, 300).round(1), y + rng.normal(0, 1.2, 300).round(1)
    draws = rng.integers(0, 300, size=(5, 300))
    counts = np.stack([np.bincount(d, minlength=300) for d in draws])
    got = resampled_differences(counts, y, a, b)
    for i, d in enumerate(draws):
        ys, as_, bs = y[d], a[d], b[d]
        assert got["mae"][i] == pytest.approx(np.abs(ys - as_).mean() - np.abs(ys - bs).mean(), abs=1e-12)
        assert got["rmse"][i] == pytest.approx(np.sqrt(((ys - as_) ** 2).mean()) - np.sqrt(((ys - bs) ** 2).mean()),
                                               abs=1e-12)
        assert got["spearman"][i] == pytest.approx(spearmanr(ys, as_)[0] - spearmanr(ys, bs)[0], abs=1e-12)


@pytest.fixture
def both_catalogs(tmp_path) -> Path:
    """The training catalog and the hold-out in one file, the training rows under new keys and titles."""
    train = pl.read_csv(CATALOG).with_columns(pl.col("anime_id") + 50_000, pl.lit("renamed").alias("title"))
    both = tmp_path / "both.csv"
    pl.concat([train, pl.read_csv(HOLDOUT)], how="vertical_relaxed").write_csv(both)
    return both


def test_compare_scores_only_rows_neither_model_trained_on(models, both_catalogs):
    result = run("compare", "baseline-new", "--against", "baseline-old", "--data", both_catalogs, "--json")
    assert result.exit_code == 0, result.output
    compared = json.loads(result.output)
    assert compared["bundles"] == {"challenger": "baseline-new", "incumbent": "baseline-old"}
    assert compared["selected_rows"] == 520 and compared["compared_rows"] == compared["scored_rows"] == 120
    assert compared["trained_rows"] == {"challenger": 300, "incumbent": 400}  # recognised by content alone
    # The figures are eval's on the hold-out (the same SQL functions and macros), side by side.
    for role, bundle in (("challenger", "baseline-new"), ("incumbent", "baseline-old")):
        [evaluated] = json.loads(run("eval", "--data", HOLDOUT, "--model", bundle, "--json").output)
        for metric in ("n", "mae", "rmse", "spearman"):
            assert compared["metrics"][role][metric] == pytest.approx(evaluated[metric], abs=1e-9)
    for metric, interval in compared["intervals"].items():
        difference = compared["metrics"]["challenger"][metric] - compared["metrics"]["incumbent"][metric]
        assert interval["difference"] == pytest.approx(difference)
        assert interval["lo"] < difference < interval["hi"]
    # Moves and movers: the two models' own scores of the hold-out.
    scores = {}
    for bundle in ("baseline-new", "baseline-old"):
        assert run("score", "--data", HOLDOUT, "--model", bundle, "--out", f"{bundle}.parquet").exit_code == 0
        scores[bundle] = pl.read_parquet(f"{bundle}.parquet").sort("anime_id")
    change = scores["baseline-new"]["predict_score"] - scores["baseline-old"]["predict_score"]
    assert compared["moved"] == {str(t): int((change.abs() > t).sum()) for t in (0.5, 1.0)}
    largest = int(change.abs().arg_max())
    assert compared["movers"][0]["key"] == str(scores["baseline-new"]["anime_id"][largest])
    assert compared["movers"][0]["title"] == scores["baseline-new"]["title"][largest]
    assert compared["movers"][0]["change"] == pytest.approx(change[largest], abs=FP32_TOLERANCE)


def test_compare_against_production_and_its_screen(models, both_catalogs):
    assert run("promote", "baseline-old").exit_code == 0
    result = run("compare", "baseline-new", "--data", both_catalogs, "--where", "anime_id < 10060 OR anime_id > 50000",
                 "--top", "3")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "challenger baseline-new against baseline-old (production)"
    assert lines[1] == ("rows: 459 selected; trained on by the challenger 300, by the incumbent 400, by either 400; "
                        "compared on the 59 left (59 with a score)")
    assert [line.split()[0] for line in lines[4:8]] == ["n", "mae", "rmse", "spearman"]
    compared = json.loads(run("compare", "baseline-new", "--data", both_catalogs, "--where",
                              "anime_id < 10060 OR anime_id > 50000", "--json").output)
    for line in lines[5:8]:  # marked where the whole interval lies on the challenger's good side of 0
        metric = line.split()[0]
        interval = compared["intervals"][metric]
        better = interval["hi"] < 0 if metric in ("mae", "rmse") else interval["lo"] > 0
        assert line.endswith("challenger better") == better
        assert f"[{interval['lo']:+.4f}, {interval['hi']:+.4f}]" in line
    assert "largest movers" in result.output and "Fixture Title 100" in result.output
    same = run("compare", "baseline-old", "--data", both_catalogs)
    assert same.exit_code == 2 and "baseline-old is the bundle it would be compared with" in same.output


def test_compare_measures_the_newest_years_apart(models, tmp_path):
    """The newest years holding at least 15% of the compared rows: of ten years of 12 rows each, the last two."""
    dated = tmp_path / "dated.csv"
    pl.read_csv(HOLDOUT).with_columns(year=2000 + pl.col("anime_id") % 10).write_csv(dated)
    compared = json.loads(run("compare", "baseline-new", "--against", "baseline-old", "--data", dated,
                              "--json").output)
    assert compared["newest"]["years"] == "year >= 2008"
    screen = run("compare", "baseline-new", "--against", "baseline-old", "--data", dated).output.splitlines()
    newest = screen[screen.index(next(line for line in screen if line.startswith("year >= 2008"))):][2:5]
    for line in newest:  # the newest years' own intervals decide their marks
        interval = compared["newest"]["intervals"][line.split()[0]]
        assert f"[{interval['lo']:+.4f}, {interval['hi']:+.4f}]" in line
        assert line.endswith("challenger better") == (interval["hi"] < 0 if line.startswith(("mae", "rmse"))
                                                      else interval["lo"] > 0)
    [evaluated] = json.loads(run("eval", "--data", dated, "--where", "year >= 2008", "--model", "baseline-new",
                                 "--json").output)
    assert evaluated["n"] == compared["newest"]["metrics"]["challenger"]["n"] == 24
    assert compared["newest"]["metrics"]["challenger"]["mae"] == pytest.approx(evaluated["mae"], abs=1e-9)


def test_compare_refuses_a_bundle_without_its_training_rows(models, both_catalogs):
    from anime_udf.bundle import TRAINING_ROWS_FILE

    manifest_path = models / "baseline-old" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["files"][TRAINING_ROWS_FILE]
    manifest_path.write_text(json.dumps(manifest))
    (models / "baseline-old" / TRAINING_ROWS_FILE).unlink()
    result = run("compare", "baseline-new", "--against", "baseline-old", "--data", both_catalogs)
    assert result.exit_code == 1
    assert "baseline-old: records no training rows" in result.output and "retrain it" in result.output
    nothing = run("compare", "baseline-new", "--against", "baseline-new-copy", "--data", CATALOG)
    assert nothing.exit_code == 1 and "unknown model" in nothing.output


# --- train --promote-if-better ------------------------------------------------------------------------------


def valid_rows_unseen_by_the_first_300() -> int:
    """The fixture catalog's validation rows (baseline's random split) outside its first 300 rows."""
    from training.cli import BASELINE_VALID_FRACTION
    from training.common import load_split

    valid = load_split(CATALOG, default_fraction=BASELINE_VALID_FRACTION).valid
    return valid.filter(~pl.col("anime_id").is_in(pl.read_csv(CATALOG).head(300)["anime_id"].to_list())).height


def test_promote_if_better_refuses_a_worse_model_and_pins_what_served(tmp_path, other_baseline):
    models = tmp_path / "models"
    shutil.copytree(other_baseline, models / "baseline-prod")  # trained on the first 300 rows only
    result = run("train", "baseline", "--data", CATALOG, "--epochs", "1", "--seeds", "1",
                 "--out", models / "baseline-worse", "--promote-if-better", "mae")
    assert result.exit_code == 0, result.output
    rows = valid_rows_unseen_by_the_first_300()
    assert "not promoted: mae " in result.output and f"on {rows} validation rows baseline-prod never" in result.output
    assert "baseline production: unset -> baseline-prod (pinned" in result.output
    assert resolve("baseline") == models / "baseline-prod"  # not the new bundle, though it is the newest
    [entry] = read_aliases().history
    assert entry["to"] == "baseline-prod" and entry["comparison"]["rows"] == rows
    assert entry["comparison"]["hi"] >= 0  # the challenger did not win beyond the noise
    assert (entry["challenger"], entry["incumbent"], entry["promoted"]) == ("baseline-worse", "baseline-prod", False)
    # models shows the decision beside the challenger, with its figures
    listed = {r["name"]: r for r in json.loads(run("models", "--json").output)}
    assert listed["baseline-worse"]["decision"]["comparison"] == entry["comparison"]
    assert listed["baseline-prod"]["decision"] is None
    c = entry["comparison"]
    assert (f"not promoted against baseline-prod: mae {c['challenger']:.4f} against {c['incumbent']:.4f}, difference "
            f"{c['difference']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}] on {rows} rows") in run("models").output
    # Once an alias is set, a refusal leaves it as it is, is recorded all the same, and is no promotion to undo.
    again = run("train", "baseline", "--data", CATALOG, "--epochs", "1", "--seeds", "1", "--seed", "3",
                "--out", models / "baseline-worse-2", "--promote-if-better", "mae")
    assert again.exit_code == 0, again.output
    assert "not promoted: mae " in again.output and "baseline production stays baseline-prod" in again.output
    refusal = read_aliases().history[-1]
    assert (refusal["action"], refusal["from"], refusal["to"], refusal["challenger"]) == (
        "refuse", "baseline-prod", "baseline-prod", "baseline-worse-2")
    assert read_aliases().production == {"baseline": "baseline-prod"}
    back = run("promote", "--rollback", "baseline")  # undoes the pin, not the refusal
    assert back.output == "baseline production: baseline-prod -> unset (the newest serves: baseline-worse-2)\n"


def test_promote_if_better_promotes_a_better_model_with_its_comparison(tmp_path):
    models = tmp_path / "models"
    first_rows = tmp_path / "first-300.csv"
    pl.read_csv(CATALOG).head(300).write_csv(first_rows)
    weak = run("train", "baseline", "--data", first_rows, "--epochs", "1", "--seeds", "1", "--out", models / "weak")
    assert weak.exit_code == 0, weak.output
    result = run("train", "baseline", "--data", CATALOG, "--epochs", "30", "--out", models / "strong",
                 "--promote-if-better", "rmse")
    assert result.exit_code == 0, result.output
    assert "promoted strong: rmse " in result.output and "against weak's" in result.output
    assert resolve("baseline") == models / "strong"
    [entry] = read_aliases().history
    assert (entry["from"], entry["to"], entry["comparison"]["metric"]) == (None, "strong", "rmse")
    assert entry["comparison"]["rows"] == valid_rows_unseen_by_the_first_300()
    assert entry["comparison"]["hi"] < 0
    elsewhere = run("train", "baseline", "--data", CATALOG, "--out", tmp_path / "elsewhere", "--promote-if-better",
                    "mae")
    assert elsewhere.exit_code == 1 and "is elsewhere" in elsewhere.output
    assert "wrote" not in elsewhere.output and not (tmp_path / "elsewhere").exists()  # refused before training


def test_promote_if_better_needs_rows_the_serving_bundle_never_saw(tmp_path, baseline_bundle):
    models = tmp_path / "models"
    shutil.copytree(baseline_bundle, models / "baseline-full")  # trained on every row of the catalog
    assert run("promote", "baseline-full").exit_code == 0
    result = run("train", "baseline", "--data", CATALOG, "--epochs", "1", "--seeds", "1", "--out", models / "again",
                 "--promote-if-better", "spearman")
    assert result.exit_code == 0, result.output
    assert "not promoted: nothing to compare on: baseline-full was trained on every validation row" in result.output
    assert "baseline production stays baseline-full" in result.output
    assert resolve("baseline") == models / "baseline-full"
    refusal = read_aliases().history[-1]  # recorded, with why, and shown by models
    assert (refusal["action"], refusal["to"], refusal["challenger"], refusal["promoted"]) == (
        "refuse", "baseline-full", "again", False)
    assert "--promote-if-better (" in run("models").output
    assert "): not promoted: nothing to compare on: baseline-full was trained on every validation row" \
        in run("models").output


def test_promote_if_better_promotes_the_first_bundle_of_its_kind(tmp_path):
    result = run("train", "baseline", "--data", CATALOG, "--epochs", "1", "--seeds", "1",
                 "--out", tmp_path / "models" / "first", "--promote-if-better", "mae")
    assert result.exit_code == 0, result.output
    assert "promoted first: no baseline bundle served before" in result.output
    assert read_aliases().production == {"baseline": "first"}
