"""Shared test fixtures: isolated cache and models directories, a trained fixture baseline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]
CATALOG = ROOT / "fixtures" / "catalog.csv"
HOLDOUT = ROOT / "fixtures" / "holdout.csv"

# Floats are not bit-exact across CPUs, batch shapes or thread counts. Only values served from one
# cache entry or one bundle are compared bit for bit; a recomputation is compared at its contract's
# tolerance: fp32 embeddings and scores within 1e-5, bf16 within 0.02 of fp32.
FP32_TOLERANCE = 1e-5
BF16_TOLERANCE = 0.02


def assert_fp32_close(actual, expected) -> None:
    """A recomputed fp32 result: equal within the fp32 contract, whatever the batch or CPU."""
    import numpy as np

    np.testing.assert_allclose(actual, expected, rtol=0, atol=FP32_TOLERANCE)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """One embedding cache for the session's bundles (and the tests that ask for it by name), so
    that each fixture synopsis is encoded once for training."""
    return tmp_path_factory.mktemp("embedding-cache")


@pytest.fixture(scope="session", autouse=True)
def fixtures_cache(session_cache):
    """What fixtures wider than one test see (each test gets its own, isolated_dirs): the session's
    embedding cache, never the user's ~/.cache/anime-udf."""
    patch = pytest.MonkeyPatch()
    patch.setenv("ANIME_UDF_CACHE", str(session_cache))
    yield session_cache
    patch.undo()


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """Each test starts as a new user does: an empty embedding cache of its own and an empty
    models directory (a warm cache once hid a failure that every first run met)."""
    monkeypatch.setenv("ANIME_UDF_CACHE", str(tmp_path / "embedding-cache"))
    monkeypatch.setenv("ANIME_UDF_MODELS", str(tmp_path / "models"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def warm_cache(session_cache, monkeypatch) -> Path:
    """For a test that says so: the session's embedding cache, warm with the fixture synopses."""
    monkeypatch.setenv("ANIME_UDF_CACHE", str(session_cache))
    return session_cache


@pytest.fixture(params=["baseline", "fusion"])
def kind(request) -> str:
    """A test taking ``kind`` (or ``bundle``) runs for both models: every contract holds for both."""
    return request.param


@pytest.fixture
def bundle(kind, request) -> Path:
    return request.getfixturevalue(f"{kind}_bundle")


@pytest.fixture(scope="session")
def baseline_bundle(tmp_path_factory, session_cache) -> Path:
    """A baseline trained on the fixture catalog with the real packaged MiniLM encoder."""
    from anime_udf.cache import EmbeddingCache
    from training.baseline import BaselineSettings, train_baseline
    from training.common import load_split

    out = tmp_path_factory.mktemp("bundles") / "baseline-fixture"
    train_baseline(load_split(CATALOG), out, BaselineSettings(epochs=30, seeds=2),
                   cache=EmbeddingCache(session_cache / "embeddings.sqlite"), progress=False, log=lambda _: None)
    return out


@pytest.fixture
def models(tmp_path, baseline_bundle) -> Path:
    """The models directory ($ANIME_UDF_MODELS) with the session's fixture baseline in it."""
    import shutil

    directory = tmp_path / "models"
    shutil.copytree(baseline_bundle, directory / baseline_bundle.name)
    return directory


@pytest.fixture(scope="session")
def fusion_bundle(tmp_path_factory, session_cache) -> Path:
    """A fusion model with the defaults (frozen MiniLM, lexical view, refit, seeds) on the fixture catalog."""
    from anime_udf.cache import EmbeddingCache
    from training.common import load_split
    from training.fusion import FusionSettings, train_fusion

    out = tmp_path_factory.mktemp("bundles") / "fusion-fixture"
    train_fusion(load_split(CATALOG, valid_fraction=0.1), out, FusionSettings(head_epochs=30, seeds=2),
                 cache=EmbeddingCache(session_cache / "embeddings.sqlite"), progress=False, log=lambda _: None)
    return out


def older_bundle(bundle: Path, out: Path, file: str, manifest_key: str) -> Path:
    """A copy of ``bundle`` as trained before ``file`` (and its manifest entry) existed."""
    import json
    import shutil

    old = shutil.copytree(bundle, out)
    (old / file).unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest[manifest_key], manifest["files"][file]
    (old / "manifest.json").write_text(json.dumps(manifest))
    return old


@pytest.fixture
def unexplainable_baseline(baseline_bundle, tmp_path) -> Path:
    """The fixture baseline as a bundle trained before explanation references were stored."""
    from anime_udf.bundle import REFERENCE_FILE

    return older_bundle(baseline_bundle, tmp_path / "old-baseline", REFERENCE_FILE, "explain")


@pytest.fixture(scope="session")
def tiny_distilbert(tmp_path_factory) -> Path:
    """A tiny randomly initialised DistilBERT encoder + tokenizer saved like a local HF checkout."""
    import json
    import re

    import polars as pl
    import torch
    from transformers import DistilBertConfig, DistilBertModel

    directory = tmp_path_factory.mktemp("tiny-distilbert")
    texts = pl.read_csv(CATALOG)["synopsis"].to_list()
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "DistilBertTokenizer", "do_lower_case": True, "model_max_length": 128}))
    config = DistilBertConfig(vocab_size=len(words) + 5, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=128)
    torch.manual_seed(0)
    DistilBertModel(config).save_pretrained(directory)
    return directory
