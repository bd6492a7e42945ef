"""Training: choose epochs on a validation split, refit on every row, seed ensembles, devices."""

import json
import shutil

import duckdb
import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

import anime_udf
from anime_udf.bundle import read_manifest
from anime_udf.catalog import read_catalog
from anime_udf.cli import cli
from anime_udf.devices import DeviceError, resolve_device
from anime_udf.models import BaselineNet, FusionHead, SeedEnsemble
from anime_udf.scoring import Rows, load_scorer
from tests.conftest import CATALOG, HOLDOUT, assert_fp32_close
from training.baseline import BaselineSettings, train_baseline
from training.common import fit_blend, load_split

INPUTS = ("synopsis", "genres", "studio", "episodes")


def holdout_scores(bundle) -> np.ndarray:
    df = read_catalog(HOLDOUT)
    return load_scorer(bundle).predict(*(df[c].to_list() for c in INPUTS))


def train(out, **settings) -> dict:
    return train_baseline(load_split(CATALOG), out, BaselineSettings(epochs=12, **settings), progress=False,
                          log=lambda _: None)


def test_refit_on_every_row_and_seeds_are_recorded(baseline_bundle):
    manifest = read_manifest(baseline_bundle)
    training = manifest["training"]
    assert training["rows_selection_fit"] == 320 and training["rows_valid"] == 80
    assert training["final_rows"] == training["rows_train"] == 400  # every row of --data
    assert training["settings"]["refit"] and manifest["model"]["seeds"] == 2
    # Whole schedules of a quarter, half, three quarters and all of --epochs were compared.
    assert [h["epochs"] for h in training["history"]] == [8, 15, 22, 30]
    assert training["epochs"] in (8, 15, 22, 30)
    assert manifest["metrics"]["valid"]["n"] == 80


def test_an_unknown_studio_weighs_nothing(bundle):
    """A rare, NULL or never-seen studio adds nothing to the first layer of either model: a
    learned weight gave studios newer than the training rows the rare ones' (reference_fusion.py)."""
    scorer = load_scorer(bundle)
    df = read_catalog(HOLDOUT)
    inputs = scorer.head_inputs(Rows(df["synopsis"].to_list(), df["genres"].to_list(), [None] * df.height,
                                     df["episodes"].to_list()))
    for member in scorer.net.members:
        assert torch.count_nonzero(member.first_layer_share(member.STUDIO, *inputs)) == 0


def test_same_seed_same_scores_other_seed_or_no_refit_other_scores(tmp_path):
    first = train(tmp_path / "a", seeds=2)
    second = train(tmp_path / "b", seeds=2)
    assert first["training"]["history"] == second["training"]["history"]
    assert_fp32_close(holdout_scores(tmp_path / "a"), holdout_scores(tmp_path / "b"))  # trained twice

    other_seed = train(tmp_path / "c", seeds=2, seed=7)
    assert other_seed["training"]["settings"]["seed"] == 7
    assert not np.allclose(holdout_scores(tmp_path / "a"), holdout_scores(tmp_path / "c"))

    kept = train(tmp_path / "d", seeds=2, refit=False)
    assert kept["training"]["final_rows"] == 320
    assert not np.allclose(holdout_scores(tmp_path / "a"), holdout_scores(tmp_path / "d"))


def test_an_ensemble_scores_the_mean_of_its_members(baseline_bundle):
    scorer = load_scorer(baseline_bundle)
    df = read_catalog(HOLDOUT)
    together = scorer.predict(*(df[c].to_list() for c in INPUTS))
    members = scorer.net.members
    assert len(members) == 2
    single = []
    for member in members:
        scorer.net.members = torch.nn.ModuleList([member])
        single.append(scorer.predict(*(df[c].to_list() for c in INPUTS)))
    scorer.net.members = members
    assert not np.allclose(single[0], single[1])
    np.testing.assert_allclose(together, np.mean(single, axis=0), atol=1e-5)  # no row is clamped here


@pytest.mark.parametrize("net", [BaselineNet, FusionHead])
@pytest.mark.parametrize("studio_dim", [0, 4])  # one-hot studio columns, or a learned embedding
def test_the_ensemble_runs_its_members_at_once_as_each_alone(net, studio_dim):
    """SeedEnsemble's one stacked pass gives the mean of what each member gives alone."""
    torch.manual_seed(0)
    members = [net(384, 12, 9, studio_dim).eval() for _ in range(3)]
    rows = 50
    inputs = [torch.randn(rows, 384), torch.rand(rows, 12), torch.randint(0, 9, (rows,))]
    inputs += [torch.randn(rows)] if net is FusionHead else []
    with torch.inference_mode():
        together = SeedEnsemble(members)(*inputs)
        alone = torch.stack([member(*inputs) for member in members]).mean(0)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_device_choice(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_cuda_without_a_gpu_is_a_one_line_error(monkeypatch, baseline_bundle, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(cli, ["train", "baseline", "--data", str(CATALOG), "--device", "cuda",
                                      "--out", str(tmp_path / "b")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: device 'cuda' was asked for, but no CUDA GPU is available here (use --device auto or cpu)"]
    assert not (tmp_path / "b").exists()
    with pytest.raises(DeviceError):
        anime_udf.register(duckdb.connect(), baseline=baseline_bundle, device="cuda")


def dated_catalog():
    """The fixture catalog with a year column: 40 titles a year, 2011-2020."""
    df = pl.read_csv(CATALOG)
    return df.with_columns(year=pl.Series([2011 + i // 40 for i in range(df.height)]))


def test_a_dated_catalog_validates_on_its_newest_years():
    split = load_split(dated_catalog())
    assert split.selection == {"how": "time", "where": '"year" >= 2019', "rows": 80}
    assert split.valid["year"].min() == 2019 and split.fit["year"].max() == 2018
    assert split.refit.height == 400  # the final model still trains on every row
    # premiered ("Spring 2019") dates a title as well
    premiered = dated_catalog().with_columns(premiered="Spring " + pl.col("year").cast(pl.String)).drop("year")
    assert load_split(premiered).valid.height == 80


def test_valid_where_chooses_the_validation_rows_and_the_manifest_says_so(tmp_path):
    result = CliRunner().invoke(cli, ["train", "baseline", "--data", str(write_dated(tmp_path)), "--epochs", "4",
                                      "--seeds", "1", "--valid-where", "year >= 2018 AND anime_id % 2 = 0",
                                      "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    training = read_manifest(tmp_path / "b")["training"]
    assert training["validation"] == {"how": "where", "where": "year >= 2018 AND anime_id % 2 = 0", "rows": 60}
    assert training["rows_valid"] == 60 and training["final_rows"] == 400
    # an explicit random fraction still works on a dated catalog
    split = load_split(dated_catalog(), valid_fraction=0.25)
    assert split.selection["how"] == "random" and split.valid.height == 100


@pytest.mark.parametrize("predicate, message", [
    ("yeer >= 2018", "--valid-where 'yeer >= 2018': Binder Error: Referenced column \"yeer\" not found"),
    ("year >= 2030", "--valid-where 'year >= 2030' selects 0 of"),
    ("year > 0", "--valid-where 'year > 0' selects 400 of"),
])
def test_a_bad_valid_where_is_a_clear_error_before_training(tmp_path, predicate, message):
    result = CliRunner().invoke(cli, ["train", "baseline", "--data", str(write_dated(tmp_path)),
                                      "--valid-where", predicate, "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "b").exists()


def write_dated(tmp_path):
    path = tmp_path / "dated.csv"
    dated_catalog().write_csv(path)
    return path


@pytest.mark.parametrize("predicate, message", [
    ("true); COPY (SELECT 'x') TO 'out.csv'; SELECT __row FROM catalog WHERE (anime_id % 5 = 0",
     "is not one SQL expression"),
    ("anime_id IN (SELECT anime_id FROM read_csv('ids.csv'))", "disabled by configuration"),
])
def test_valid_where_is_one_expression_that_reads_and_writes_no_file(tmp_path, predicate, message):
    """As eval --where: one expression, no second statement, no file read or written."""
    pl.DataFrame({"anime_id": [1, 2, 3]}).write_csv(tmp_path / "ids.csv")  # the tests run in tmp_path
    result = CliRunner().invoke(cli, ["train", "baseline", "--data", str(write_dated(tmp_path)), "--epochs", "1",
                                      "--seeds", "1", "--valid-where", predicate, "--out", str(tmp_path / "b")])
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
    assert result.output.startswith("Error: --valid-where") and "Traceback" not in result.output
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("years", [
    [-2020 + i // 40 for i in range(400)],  # BC: -2020 … -2011
    [-5 + i // 40 for i in range(400)],  # across year 0
    [-1000 + 300 * (i // 40) for i in range(400)],  # -1000 … 1700
    [995 + i // 40 for i in range(400)],  # three and four digits
    [2011.5 + i // 40 for i in range(400)],  # not whole
    [None] * 40 + [2012 + i // 40 for i in range(360)],  # undated titles
])
def test_the_time_split_validates_on_the_newest_share_of_any_years(years):
    from training.common import TIME_VALID_SHARE

    split = load_split(pl.read_csv(CATALOG).with_columns(year=pl.Series(years)))
    assert split.selection["how"] == "time", split.selection
    assert split.valid.height >= TIME_VALID_SHARE * 400 and split.fit.height >= 2
    assert split.valid["year"].min() > split.fit["year"].max()  # the newest years, every title of each
    assert split.valid.height < 400 * 0.3  # and no more of them than it takes


def test_the_time_split_leaves_rows_to_fit_on_or_falls_back_to_a_random_split():
    catalog = pl.read_csv(CATALOG)
    nearly_all_new = catalog.with_columns(year=pl.Series([2019] + [2020] * 399))
    assert load_split(nearly_all_new).selection["how"] == "random"
    assert load_split(catalog.with_columns(year=pl.Series([2019] * 2 + [2020] * 398))).fit.height == 2


def test_a_catalog_with_a_row_column_splits_as_any_other():
    """The split's own row numbers never collide with a catalog column (the catalog's own __row stays)."""
    catalog = dated_catalog().with_columns(__row=pl.lit("the catalog's"))
    assert load_split(catalog).selection == {"how": "time", "where": '"year" >= 2019', "rows": 80}
    split = load_split(catalog, valid_where="__row = 'the catalog''s' AND anime_id % 2 = 0")
    assert split.valid.height == (catalog["anime_id"] % 2 == 0).sum()
    assert split.valid["__row"].unique().to_list() == ["the catalog's"]


# --- the blend after the head -----------------------------------------------------------------


def test_fit_blend_finds_the_weights_and_stays_near_the_head_on_a_few_rows():
    rng = np.random.default_rng(0)
    head, lexical = rng.normal(size=(2, 2000))
    y = 0.8 * head + 0.2 * lexical + 0.1 + rng.normal(scale=0.3, size=2000)
    blend = fit_blend(head, y, lexical)
    assert blend["fitted_on_rows"] == 2000
    np.testing.assert_allclose([blend["head"], blend["lexical"], blend["constant"]], [0.8, 0.2, 0.1], atol=0.03)
    assert fit_blend(head, y)["lexical"] == 0.0  # the baseline has no lexical score
    # Five validation rows say little: the blend stays close to the head alone (1, 0, 0).
    few = fit_blend(head[:5], 3 * y[:5], lexical[:5])
    assert abs(few["head"] - 1) < 0.5 and abs(few["lexical"]) < 0.5 and abs(few["constant"]) < 0.5


def with_blend(bundle, tmp_path, name, **blend):
    """A copy of ``bundle`` whose manifest holds this blend (the fixture bundles have none)."""
    copy = shutil.copytree(bundle, tmp_path / name)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["blend"] = {"head": 1.0, "lexical": 0.0, "constant": 0.0} | blend
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_the_blend_in_the_manifest_is_what_scoring_applies(bundle, kind, tmp_path):
    manifest = read_manifest(bundle)
    std, mean = manifest["target"]["std"], manifest["target"]["mean"]
    df = read_catalog(HOLDOUT)
    columns = [df[c].to_list() for c in INPUTS]
    head_alone = load_scorer(bundle).predict(*columns)  # no blend: the head alone
    # The identity blend changes nothing.
    np.testing.assert_array_equal(load_scorer(with_blend(bundle, tmp_path, "identity")).predict(*columns), head_alone)
    # The constant moves every score (not clamped) by itself times the target's deviation.
    shifted = load_scorer(with_blend(bundle, tmp_path, "shifted", constant=0.25)).predict(*columns)
    inside = (shifted < 10) & (head_alone > 1)
    assert inside.sum() > 10
    np.testing.assert_allclose(shifted[inside] - head_alone[inside], 0.25 * std, atol=1e-6)
    # Nothing from the head: every title scores the training mean.
    flat = with_blend(bundle, tmp_path, "flat", head=0.0)
    np.testing.assert_allclose(load_scorer(flat).predict(*columns), mean, atol=1e-9)
    if kind == "fusion":  # the lexical score's direct share
        scorer = load_scorer(with_blend(bundle, tmp_path, "lexical", lexical=0.5))
        with_lexical = scorer.predict(*columns)
        inside = (with_lexical > 1) & (with_lexical < 10) & (head_alone > 1) & (head_alone < 10)
        np.testing.assert_allclose(with_lexical[inside] - head_alone[inside],
                                   0.5 * scorer.lexical.predict(columns[0])[inside] * std, atol=1e-5)


def test_blend_trains_one_on_the_validation_rows(tmp_path):
    args = ["train", "baseline", "--data", str(CATALOG), "--epochs", "4", "--seeds", "1"]
    for name, extra in (("head", []), ("blended", ["--blend"])):
        result = CliRunner().invoke(cli, [*args, *extra, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    assert "blend after the head" in result.output
    blended = read_manifest(tmp_path / "blended")
    assert "blend" not in read_manifest(tmp_path / "head")  # the default: the head alone
    assert blended["blend"]["fitted_on_rows"] == blended["training"]["rows_valid"] == 80
    assert not np.allclose(holdout_scores(tmp_path / "blended"), holdout_scores(tmp_path / "head"))
