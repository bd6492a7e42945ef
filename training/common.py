"""What both trainers share: data splits, target scaling, the head-fitting loop."""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
import numpy as np
import polars as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from anime_udf.catalog import CatalogError, fingerprint, read_catalog
from anime_udf.features import TabularEncoder
from anime_udf.scoring import SCORE_MAX, SCORE_MIN


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_split(data, valid=None, valid_fraction: float = 0.2, seed: int = 42) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Training and validation catalogs: an explicit ``valid`` catalog, or a seeded random split."""
    train = read_catalog(data, require_score=True)
    if valid is not None:
        return train, read_catalog(valid, require_score=True)
    if not 0.0 < valid_fraction < 1.0:
        raise CatalogError(f"--valid-fraction must be between 0 and 1, got {valid_fraction}")
    order = np.random.default_rng(seed).permutation(train.height)
    n_valid = max(1, round(train.height * valid_fraction))
    if train.height - n_valid < 2:
        raise CatalogError(f"{data}: {train.height} rows are too few to split into training and validation")
    return train[order[n_valid:]], train[order[:n_valid]]


@dataclass
class TargetScaler:
    mean: float
    std: float

    @classmethod
    def fit(cls, y: np.ndarray) -> "TargetScaler":
        return cls(float(np.mean(y)), float(np.std(y)) or 1.0)

    def scale(self, y: np.ndarray) -> np.ndarray:
        return ((y - self.mean) / self.std).astype(np.float32)

    def unscale(self, z: np.ndarray) -> np.ndarray:
        return np.clip(z.astype(np.float64) * self.std + self.mean, SCORE_MIN, SCORE_MAX)


@dataclass
class TabularSplit:
    """The tabular side of a training run, fitted on the training rows only."""

    features: TabularEncoder
    scaler: TargetScaler
    train: tuple[np.ndarray, np.ndarray]  # (dense, studio index)
    valid: tuple[np.ndarray, np.ndarray]
    y_train: np.ndarray  # standardised scores
    y_valid: np.ndarray

    @classmethod
    def fit(cls, train: pl.DataFrame, valid: pl.DataFrame, min_studio_count: int) -> "TabularSplit":
        features = TabularEncoder.fit(train["genres"].to_list(), train["studio"].to_list(),
                                      train["episodes"].to_list(), min_studio_count)
        scaler = TargetScaler.fit(train["score"].to_numpy())

        def encode(df: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
            return features.encode(df["genres"].to_list(), df["studio"].to_list(), df["episodes"].to_list())

        return cls(features, scaler, encode(train), encode(valid),
                   scaler.scale(train["score"].to_numpy()), scaler.scale(valid["score"].to_numpy()))


def training_record(train: pl.DataFrame, valid: pl.DataFrame, settings: dict, **extra) -> dict:
    return {
        "data_fingerprint": fingerprint(train),
        "valid_fingerprint": fingerprint(valid),
        "rows_train": train.height,
        "rows_valid": valid.height,
        "settings": settings,
        **extra,
    }


@dataclass
class FitResult:
    best_state: dict
    best_epoch: int
    best_rmse: float
    history: list[dict] = field(default_factory=list)


def fit_on_features(
    net: nn.Module,
    train_inputs: tuple[np.ndarray, np.ndarray, np.ndarray],
    y_train: np.ndarray,
    valid_inputs: tuple[np.ndarray, np.ndarray, np.ndarray],
    y_valid: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    grad_clip: float = 5.0,
    progress: bool = True,
) -> FitResult:
    """Train a network taking (text features, dense tabular, studio index) on fixed
    features: AdamW, cosine annealing, MSE, gradient clipping; keep the best
    validation RMSE (in standardised units: the ranking is the same)."""
    torch.manual_seed(seed)
    x_train = [torch.from_numpy(a) for a in train_inputs]
    x_valid = [torch.from_numpy(a) for a in valid_inputs]
    t_train, t_valid = torch.from_numpy(y_train), torch.from_numpy(y_valid)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(t_train) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    result = FitResult({}, -1, math.inf)
    bar = tqdm(range(1, epochs + 1), desc="training", unit="epoch", disable=not progress)
    for epoch in bar:
        start = time.perf_counter()
        net.train()
        total = 0.0
        for idx in torch.randperm(len(t_train), generator=generator).split(batch_size):
            loss = nn.functional.mse_loss(net(*(x[idx] for x in x_train)), t_train[idx])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
        net.eval()
        with torch.inference_mode():
            rmse = torch.sqrt(nn.functional.mse_loss(net(*x_valid), t_valid)).item()
        result.history.append({"epoch": epoch, "train_mse": total / len(t_train), "valid_rmse_std": rmse,
                               "seconds": round(time.perf_counter() - start, 3)})
        if rmse < result.best_rmse:
            result.best_rmse, result.best_epoch = rmse, epoch
            result.best_state = copy.deepcopy(net.state_dict())
        bar.set_postfix(train_mse=f"{total / len(t_train):.4f}", valid_rmse=f"{rmse:.4f}", best=result.best_epoch)
    net.load_state_dict(result.best_state)
    net.eval()
    return result
