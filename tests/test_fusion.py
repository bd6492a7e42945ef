"""The fusion model: DistilBERT code path (tiny random backbone), real MiniLM steps, resume."""

import duckdb
import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

import anime_udf
from anime_udf.bundle import read_manifest
from anime_udf.cache import EmbeddingCache
from anime_udf.catalog import read_catalog
from anime_udf.cli import cli
from anime_udf.scoring import load_scorer
from anime_udf.text import weights_checksum
from tests.conftest import CATALOG, HOLDOUT
from training.common import load_split
from training.fine_tune import Checkpoint, ResumeError
from training.fusion import FusionSettings, train_fusion

INPUTS = ("synopsis", "genres", "studio", "episodes")


@pytest.fixture(scope="module")
def tiny_bundle(tiny_distilbert, tmp_path_factory):
    out = tmp_path_factory.mktemp("fusion") / "fusion-tiny"
    result = CliRunner().invoke(cli, [
        "train", "fusion", "--data", str(CATALOG), "--out", str(out), "--backbone", str(tiny_distilbert),
        "--pooling", "cls", "--epochs", "2", "--head-epochs", "5", "--max-length", "64", "--batch-size", "16",
        "--lr-encoder", "1e-4", "--lr-head", "1e-3"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "epoch 2/2: validation RMSE" in result.output and "validation (selection run): n=40" in result.output
    return out


def test_tiny_distilbert_bundle_scores_through_sql(tiny_bundle):
    manifest = read_manifest(tiny_bundle)
    assert manifest["kind"] == "fusion" and manifest["text_model"]["pooling"] == "cls"
    assert manifest["text_model"]["architecture"] == "distilbert" and manifest["text_model"]["in_bundle"]
    assert (tiny_bundle / "tokenizer").is_dir() and (tiny_bundle / "encoder" / "model.safetensors").is_file()
    assert not list(tiny_bundle.parent.glob(".*checkpoint*"))  # cleaned up after the bundle was written

    con = duckdb.connect()
    anime_udf.register(con, fusion=tiny_bundle)
    holdout = read_catalog(HOLDOUT)
    sql = con.sql("SELECT predict_score_fusion(synopsis, genres, studio, episodes) AS p FROM holdout "
                  "ORDER BY anime_id").pl()["p"].to_numpy()
    direct = load_scorer(tiny_bundle).predict(*(holdout.sort("anime_id")[c].to_list() for c in INPUTS))
    np.testing.assert_allclose(sql, direct, atol=1e-4)
    assert ((sql >= 1) & (sql <= 10)).all()


def test_fusion_row_alone_equals_row_in_a_batch_and_nulls_score(tiny_bundle):
    scorer = load_scorer(tiny_bundle)
    df = read_catalog(HOLDOUT)
    batch = scorer.predict(*(df[c].to_list() for c in INPUTS))
    for i in (0, 57, 119):
        alone = scorer.predict(*([df[c][i]] for c in INPUTS))
        assert abs(alone[0] - batch[i]) <= 1e-4
    odd = scorer.predict([None, "  "], [None, "nope"], [None, ""], [None, -3])
    assert np.isfinite(odd).all() and ((odd >= 1) & (odd <= 10)).all()


def test_eval_compares_both_kinds_side_by_side(tiny_bundle, baseline_bundle):
    result = CliRunner().invoke(cli, ["eval", "--data", str(HOLDOUT), "--model", str(baseline_bundle),
                                      "--model", str(tiny_bundle), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    import json

    assert [r["model"] for r in json.loads(result.output)] == ["baseline", "fusion"]


def test_real_minilm_backbone_trains_a_few_steps(tmp_path):
    split = load_split(pl.read_csv(CATALOG).head(60), valid_fraction=0.25)
    settings = FusionSettings(epochs=1, head_epochs=2, batch_size=15, max_length=32, seeds=1)
    manifest = train_fusion(split, tmp_path / "f", settings, progress=False, log=lambda _: None)
    assert manifest["training"]["fine_tuning"]["step"] == 3 and manifest["text_model"]["name"] == "all-MiniLM-L6-v2"
    assert load_scorer(tmp_path / "f").predict(["A war story."], ["Drama"], [None], [12])[0] > 1


def test_resume_after_interruption_continues_from_the_checkpoint(tiny_distilbert, tmp_path):
    split = load_split(CATALOG)
    settings = FusionSettings(backbone=str(tiny_distilbert), epochs=2, head_epochs=2, batch_size=64,
                              max_length=48, checkpoint_every=2, seeds=1)
    reference = train_fusion(split, tmp_path / "ref", settings, progress=False, log=lambda _: None)

    def interrupt_at_step_7(step):
        if step == 7:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_fusion(split, out, settings, progress=False, log=lambda _: None, on_step=interrupt_at_step_7)
    assert not out.exists()  # no half-written bundle
    assert Checkpoint(out).exists()

    other = FusionSettings(**{**settings.__dict__, "lr_head": 1e-3})
    with pytest.raises(ResumeError, match="other settings"):
        train_fusion(split, out, other, resume=True, progress=False, log=lambda _: None)
    other_data = load_split(pl.read_csv(CATALOG).head(300))
    with pytest.raises(ResumeError, match="other training data"):
        train_fusion(other_data, out, settings, resume=True, progress=False, log=lambda _: None)

    messages = []
    resumed = train_fusion(split, out, settings, resume=True, progress=False, log=messages.append)
    assert any("resuming" in m and "at step 7 of 10" in m for m in messages)
    assert resumed["training"]["fine_tuning"]["step"] == reference["training"]["fine_tuning"]["step"] == 10
    # Same batches, optimizer state and RNG: the resumed run ends where the uninterrupted one did.
    assert resumed["metrics"]["valid"]["mae"] == pytest.approx(reference["metrics"]["valid"]["mae"], abs=1e-6)
    assert not Checkpoint(out).exists()


def test_a_frozen_fusion_model_shares_the_baseline_embedding_cache(baseline_bundle, fusion_bundle, tmp_path,
                                                                   monkeypatch):
    cache = EmbeddingCache(tmp_path / "embeddings.sqlite")
    holdout = read_catalog(HOLDOUT)
    columns = [holdout[c].to_list() for c in INPUTS]
    baseline = load_scorer(baseline_bundle, cache=cache)
    baseline.predict(*columns)
    fusion = load_scorer(fusion_bundle, cache=cache)
    assert fusion.text_encoder.encoder_id == baseline.text_encoder.encoder_id
    monkeypatch.setattr(fusion.text_encoder, "_encode", lambda *a, **k: pytest.fail("encoded a cached synopsis"))
    assert np.isfinite(fusion.predict(*columns)).all()


def test_a_tuned_encoder_ships_in_the_bundle_under_its_own_checksum(tiny_bundle):
    text_model = read_manifest(tiny_bundle)["text_model"]
    scorer = load_scorer(tiny_bundle)
    assert scorer.text_encoder.path == tiny_bundle / "encoder"
    assert text_model["checksum"] == scorer.text_encoder.checksum == weights_checksum(str(tiny_bundle / "encoder"))
    assert text_model["fine_tuned"] == (read_manifest(tiny_bundle)["training"]["fine_tuning"]["best_epoch"] > 0)


@pytest.mark.parametrize("config", ["encoder/config.json", "tokenizer/tokenizer_config.json"])
def test_a_bundle_that_names_custom_code_is_refused_without_a_prompt(tiny_bundle, tmp_path, config):
    """transformers would ask "Do you wish to run the custom code?" and, answered y, run the bundle's Python."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from anime_udf.bundle import file_sha256

    bundle = shutil.copytree(tiny_bundle, tmp_path / "evil")
    marker = tmp_path / "code-ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    for sub in ("encoder", "tokenizer"):
        (bundle / sub / "evil.py").write_text(code + "class Evil: pass\n")
    path = bundle / config
    data = json.loads(path.read_text())
    data.pop("model_type", None)
    data["auto_map"] = {"AutoModel": "evil.Evil", "AutoConfig": "evil.Evil", "AutoTokenizer": ["evil.Evil", None]}
    path.write_text(json.dumps(data))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"] = {str(p.relative_to(bundle)): file_sha256(p) for p in bundle.rglob("*")
                         if p.is_file() and p.name != "manifest.json"}
    (bundle / "manifest.json").write_text(json.dumps(manifest))

    anime_udf_command = str(Path(sys.executable).parent / "anime-udf")
    result = subprocess.run([anime_udf_command, "eval", "--data", str(HOLDOUT),
                             "--model", str(bundle)], input="y\ny\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "auto_map" in result.stderr and "never runs code" in result.stderr
    assert "custom code?" not in result.stdout + result.stderr
    assert not marker.exists()
