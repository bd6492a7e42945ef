"""Baseline: frozen all-MiniLM-L6-v2 sentence embedding + tabular features -> MLP."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from anime_udf.bundle import check_out, write_bundle
from anime_udf.cache import EmbeddingCache
from anime_udf.columns import SCORE_COLUMN, SYNOPSIS
from anime_udf.devices import resolve_device
from anime_udf.bundle import CALIBRATION_FILE, HEAD_WEIGHTS, REFERENCE_FILE, TRAINING_ROWS_FILE
from anime_udf.explain import reference_manifest, reference_state
from anime_udf.models import BaselineNet
from anime_udf.text import DEFAULT_ENCODER_NAME, FrozenTextEncoder, default_encoder_path
from training.calibration import calibrate
from training.common import (DataSplit, HeadTraining, Tabular, blend_and_validate, embed_frozen, refit_ensemble,
                             seed_everything, select_epochs, training_record, training_rows_state)


@dataclass
class BaselineSettings:
    """The defaults, each measured on new titles (docs/experiments.md, "What each choice changed on
    new titles"; the blend: docs/performance.md, "The blend is a trade"; precision: docs/performance.md,
    "Speed")."""

    epochs: int = 80  # the most; the selection run chooses how many (new titles gained to 80)
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    dropout: float = 0.5
    studio_dim: int = 0  # one-hot studios: better than a 16-d embedding on new titles
    min_studio_count: int = 3
    max_length: int = 256  # all-MiniLM-L6-v2's own limit
    seeds: int = 3  # heads averaged: each seed's errors differ; scoring cost is the encoder's
    refit: bool = True  # refit on every training row with the chosen epochs
    blend: bool = False  # head x a + c after the head: better on newer titles, worse on others
    seed: int = 42
    device: str = "auto"
    precision: str = "fp32"  # the frozen encoder's: bf16 measured 0.001 MAE worse

    def head_training(self) -> HeadTraining:
        return HeadTraining(self.epochs, self.batch_size, self.lr, self.weight_decay, self.seeds)


def train_baseline(
    split: DataSplit,
    out: Path,
    settings: BaselineSettings | None = None,
    *,
    name: str | None = None,
    force: bool = False,
    cache: EmbeddingCache | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_validated: Callable[[np.ndarray], None] | None = None,
) -> dict:
    """Choose epochs on ``split.valid``, refit on ``split.refit``, write a bundle to ``out``; return its manifest.
    An existing ``out`` is refused before any work, unless ``force`` and it is a baseline bundle.
    ``on_validated`` is given the selection run's scores of ``split.valid``'s rows, as the model ships them."""
    check_out(out, "baseline", force=force)
    settings = settings or BaselineSettings()
    device = resolve_device(settings.device)
    seed_everything(settings.seed)
    started = time.perf_counter()
    text = FrozenTextEncoder(default_encoder_path(), pooling="mean", max_length=settings.max_length,
                             cache=cache if cache is not None else EmbeddingCache(), device=device,
                             precision=settings.precision)
    log(f"embedding the synopses with {DEFAULT_ENCODER_NAME} on {device} in {text.precision} (cached by content hash)")
    emb_fit, emb_valid, emb_refit = embed_frozen(text, [split.fit, split.valid, split.refit], progress)
    encode_seconds = time.perf_counter() - started

    final_rows, emb_final = (split.refit, emb_refit) if settings.refit else (split.fit, emb_fit)
    # The selection run knows only its own rows' studios and genres, so a validation title from
    # a studio it never saw is scored as a new title's will be: as the unknown studio.
    sel_tab = Tabular.fit(split.fit, settings.min_studio_count)
    tab = Tabular.fit(final_rows, settings.min_studio_count)
    net = partial(BaselineNet, emb_fit.shape[1], studio_dim=settings.studio_dim, dropout=settings.dropout)
    how = settings.head_training()
    fit_started = time.perf_counter()
    log(f"selection run: training on {split.fit.height} rows, validating on {split.valid.height} "
        f"(schedules of {how.schedule_lengths()} epochs)")
    y_valid = sel_tab.target(split.valid)
    selection = select_epochs(partial(net, *sel_tab.shape()), (emb_fit, *sel_tab.inputs(split.fit)),
                              sel_tab.target(split.fit), (emb_valid, *sel_tab.inputs(split.valid)),
                              y_valid, how, settings.seed, device, progress)
    blend, metrics, valid_scores = blend_and_validate(settings.blend, selection, y_valid,
                                                      split.valid[SCORE_COLUMN].to_numpy(), sel_tab.scaler, log)
    if on_validated:
        on_validated(valid_scores)
    calibration, calibration_state = calibrate(
        selection, blend, sel_tab.scaler, split.valid[SCORE_COLUMN].to_numpy(), tab.inputs(split.valid)[0],
        sel_tab.inputs(split.valid)[1], tab.features.genres, split.valid[SYNOPSIS].to_list(), None, split.selection,
        settings.seed, log)
    log(f"chose {selection.best_epochs} epochs; final model: {settings.seeds} seed(s) x {selection.best_epochs} "
        f"epochs on {final_rows.height} rows")
    final_inputs = (emb_final, *tab.inputs(final_rows))
    ensemble = refit_ensemble(partial(net, *tab.shape()), final_inputs, tab.target(final_rows), selection.best_epochs,
                              how, settings.seed, device, progress)

    manifest = {
        "kind": "baseline",
        "name": name or Path(out).name,
        "features": tab.features.to_manifest(),
        "text_model": {"name": DEFAULT_ENCODER_NAME, "checksum": text.checksum, "in_bundle": False,
                       "pooling": "mean", "max_length": settings.max_length, "normalize": True},
        "model": {"text_dim": int(emb_fit.shape[1]), "studio_dim": settings.studio_dim,
                  "dropout": settings.dropout, "seeds": settings.seeds},
        "target": {"mean": tab.scaler.mean, "std": tab.scaler.std},
        **({"blend": blend} if blend else {}),
        "training": training_record(
            split, asdict(settings), epochs=selection.best_epochs, final_rows=final_rows.height,
            embedding_precision=text.precision, encode_seconds=round(encode_seconds, 1),
            fit_seconds=round(time.perf_counter() - fit_started, 1), history=selection.history),
        "metrics": {"valid": metrics},
        "explain": reference_manifest("baseline"),
        "calibration": calibration,
    }
    write_bundle(out, manifest, {HEAD_WEIGHTS["baseline"]: ensemble.state_dict(),
                                 REFERENCE_FILE: reference_state(final_inputs),
                                 CALIBRATION_FILE: calibration_state,
                                 TRAINING_ROWS_FILE: training_rows_state(split)}, force=force)
    return manifest
