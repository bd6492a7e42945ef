"""Baseline: frozen all-MiniLM-L6-v2 sentence embedding + tabular features -> MLP."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import polars as pl
import torch

from anime_udf.bundle import write_bundle
from anime_udf.cache import EmbeddingCache
from anime_udf.metrics import compute_metrics
from anime_udf.models import BaselineNet
from anime_udf.scoring import sentence_embedding
from anime_udf.text import DEFAULT_ENCODER_NAME, FrozenTextEncoder, default_encoder_path
from training.common import TabularSplit, fit_on_features, seed_everything, training_record


@dataclass
class BaselineSettings:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    dropout: float = 0.6  # heavy: the 384-d embedding + MLP overfits 9k rows otherwise
    studio_dim: int = 16
    min_studio_count: int = 2
    max_length: int = 256  # all-MiniLM-L6-v2's own limit
    seed: int = 42


def train_baseline(
    train: pl.DataFrame,
    valid: pl.DataFrame,
    out: Path,
    settings: BaselineSettings | None = None,
    *,
    name: str | None = None,
    cache: EmbeddingCache | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Fit the baseline on ``train``, select on ``valid``, write a bundle to ``out``; return its manifest."""
    settings = settings or BaselineSettings()
    seed_everything(settings.seed)
    started = time.perf_counter()
    text = FrozenTextEncoder(default_encoder_path(), pooling="mean", max_length=settings.max_length,
                             cache=cache if cache is not None else EmbeddingCache())
    texts = train["synopsis"].to_list() + valid["synopsis"].to_list()
    log(f"embedding {len(texts)} synopses with {DEFAULT_ENCODER_NAME} (cached by content hash)")
    emb = sentence_embedding(text.embed(texts, progress=progress))
    encode_seconds = time.perf_counter() - started

    tab = TabularSplit.fit(train, valid, settings.min_studio_count)
    train_x = (emb[: train.height], *tab.train)
    valid_x = (emb[train.height :], *tab.valid)
    net = BaselineNet(emb.shape[1], tab.features.n_tabular, tab.features.n_studios, settings.studio_dim,
                      settings.dropout)
    log(f"training on {train.height} rows, selecting on {valid.height} ({settings.epochs} epochs)")
    fit_started = time.perf_counter()
    fit = fit_on_features(net, train_x, tab.y_train, valid_x, tab.y_valid,
                          epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                          weight_decay=settings.weight_decay, seed=settings.seed, progress=progress)
    with torch.inference_mode():
        pred = tab.scaler.unscale(net(*(torch.from_numpy(a) for a in valid_x)).numpy())
    metrics = compute_metrics(valid["score"].to_numpy(), pred)

    manifest = {
        "kind": "baseline",
        "name": name or Path(out).name,
        "features": tab.features.to_manifest(),
        "text_model": {"name": DEFAULT_ENCODER_NAME, "checksum": text.checksum,
                       "pooling": "mean", "max_length": settings.max_length, "normalize": True},
        "model": {"text_dim": int(emb.shape[1]), "studio_dim": settings.studio_dim, "dropout": settings.dropout},
        "target": {"mean": tab.scaler.mean, "std": tab.scaler.std},
        "training": training_record(
            train, valid, asdict(settings), best_epoch=fit.best_epoch,
            encode_seconds=round(encode_seconds, 1),
            fit_seconds=round(time.perf_counter() - fit_started, 1), history=fit.history),
        "metrics": {"valid": metrics},
    }
    write_bundle(out, manifest, {"model.safetensors": net.state_dict()})
    return manifest
