"""Training: choose epochs on a validation split, refit on every row, seed ensembles, devices."""

import duckdb
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import anime_udf
from anime_udf.bundle import read_manifest
from anime_udf.catalog import read_catalog
from anime_udf.cli import cli
from anime_udf.devices import DeviceError, resolve_device
from anime_udf.scoring import load_scorer
from tests.conftest import CATALOG, HOLDOUT
from training.baseline import BaselineSettings, train_baseline
from training.common import load_split

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


def test_same_seed_same_scores_other_seed_or_no_refit_other_scores(tmp_path):
    first = train(tmp_path / "a", seeds=2)
    second = train(tmp_path / "b", seeds=2)
    assert first["training"]["history"] == second["training"]["history"]
    np.testing.assert_array_equal(holdout_scores(tmp_path / "a"), holdout_scores(tmp_path / "b"))

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
