"""Calibration for prediction intervals (anime_udf.intervals, docs/intervals.md), fitted on the
selection run's validation rows: the rows its ensemble never trained on, the newest years by
default (or what --valid / --valid-where chose), scored as the bundle's model scores them."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from anime_udf.columns import SCORE_MAX, SCORE_MIN
from anime_udf.features import clean_text
from anime_udf.intervals import (LOCATION_FEATURES, guaranteed_coverage, log_scale, scale_feature_names,
                                 scale_features)
from anime_udf.models import Blend
from training.common import Selection, TargetScaler

FOLDS = 5  # the scale model behind each row's normalised error is fitted on the other folds
ERROR_FLOOR = 1e-3  # score units: an exact hit would pull its scale to 0
SCALE_RIDGE = 10.0  # a ridge on the standardised features, as if by this many rows
REPORTED_LEVELS = (0.5, 0.8, 0.9, 0.95)


def fit_scale(features: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Weights over the scale features (``scale_feature_names``) of log E|error| given the features: a Gamma (exponential)
    regression with a log link, by Newton's method, ridge on the standardised features. Unlike
    least squares on log |error|, its ratio of two rows' scales is unbiased for errors of any
    one shape (least squares on log |error| + a floor narrowed the wide rows' intervals)."""
    mean, std = features[:, 1:].mean(axis=0), features[:, 1:].std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)  # a constant feature (no lexical view): weight 0
    x = np.column_stack([np.ones(len(features)), (features[:, 1:] - mean) / std])
    e = np.maximum(errors, ERROR_FLOOR)
    ridge = SCALE_RIDGE / len(e) * np.eye(x.shape[1])
    ridge[0, 0] = 0.0  # the intercept is not shrunk
    w = np.zeros(x.shape[1])
    w[0] = np.log(np.mean(e))
    for _ in range(50):  # loss: mean(e exp(-x w) + x w) + ridge; convex
        ratio = e * np.exp(-np.clip(x @ w, -30, 30))
        gradient = x.T @ (1 - ratio) / len(e) + ridge @ w
        step = np.linalg.solve((x * ratio[:, None]).T @ x / len(e) + ridge, gradient)
        w -= np.clip(step, -1.0, 1.0)  # a damped Newton step: far from the optimum the curvature misleads
        if np.max(np.abs(step)) < 1e-8:
            break
    return np.concatenate([[w[0] - np.sum(w[1:] * mean / std)], w[1:] / std])  # on the raw features


def fit_location(features: np.ndarray, residuals: np.ndarray) -> np.ndarray:
    """Weights over the first ``LOCATION_FEATURES`` scale features (constant, score, score squared)
    of the centre's shift m(x): least squares of y - ŷ, ridge on the standardised features."""
    x = features[:, :LOCATION_FEATURES]
    mean, std = x[:, 1:].mean(axis=0), x[:, 1:].std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    z = np.column_stack([np.ones(len(x)), (x[:, 1:] - mean) / std])
    ridge = SCALE_RIDGE * np.eye(z.shape[1])
    ridge[0, 0] = 0.0
    w = np.linalg.solve(z.T @ z + ridge, z.T @ residuals)
    return np.concatenate([[w[0] - np.sum(w[1:] * mean / std)], w[1:] / std])


def calibrate(selection: Selection, blend: dict | None, scaler: TargetScaler, y: np.ndarray,
              dense: np.ndarray, studio_index: np.ndarray, genres: Sequence[str], synopsis: Sequence[Any],
              lexical: np.ndarray | None, how_chosen: dict, seed: int,
              log: Callable[[str], None]) -> tuple[dict, dict[str, torch.Tensor]]:
    """The manifest's ``calibration`` entry and the ``CALIBRATION_FILE`` tensors, from the
    selection run's ensemble on its validation rows (targets ``y`` in score units). ``dense``
    are their features by the bundle's encoder (its vocabulary ``genres``: the scale model's
    layout, as where it serves); ``studio_index`` by the selection run's (a studio unknown to
    the model that scored the row)."""
    point = Blend.of(blend).apply(selection.valid_predictions, lexical)
    residuals = y - np.clip(point * scaler.std + scaler.mean, SCORE_MIN, SCORE_MAX)
    errors = np.abs(residuals)
    features = scale_features(selection.valid_members, point, dense, studio_index,
                              [clean_text(s) for s in synopsis], lexical)
    # Cross-fitted: each row's shift and scale come from models fitted on the other folds, so that
    # no row's own error moves or widens its interval (which would make its normalised error small).
    fold = np.random.default_rng(seed).permutation(len(y)) % FOLDS
    splits = [(fold == k, fold != k if (fold != k).any() else fold == k) for k in range(FOLDS)]  # (held, fitted)
    shifted, log_sigma = np.empty(len(y)), np.empty(len(y))
    for held, fitted in splits:
        shift = fit_location(features[fitted], residuals[fitted])
        shifted[held] = residuals[held] - features[held, :LOCATION_FEATURES] @ shift
    for held, fitted in splits:
        w = fit_scale(features[fitted], np.abs(shifted[fitted]))
        log_sigma[held] = log_scale(w, features[held], float(np.mean(features[fitted] @ w)))
    scores = np.abs(shifted) / np.exp(log_sigma)
    location = fit_location(features, residuals)
    weights = fit_scale(features, np.abs(shifted))
    centre = float(np.mean(features @ weights))
    rows = len(y)
    entry = {
        "method": "split conformal, |y - score - shift(x)| / scale(x), shift and scale cross-fitted in "
                  f"{FOLDS} folds (docs/intervals.md)",
        "rows": rows,
        "rows_chosen": how_chosen,
        "scale_features": scale_feature_names(genres),
        "log_scale_centre": centre,
        "mean_absolute_error": float(np.mean(errors)),
        # The coverage split conformal promises from these rows, for titles like them.
        "coverage": {str(level): guaranteed_coverage(rows, level) for level in REPORTED_LEVELS},
    }
    log(f"calibration: {rows} validation rows (MAE {entry['mean_absolute_error']:.3f}); for titles like them "
        "the intervals cover at least " + ", ".join(f"{c:.1%} at {lv}" for lv, c in entry["coverage"].items()))
    state = {"scores": torch.from_numpy(np.sort(scores)), "errors": torch.from_numpy(np.sort(errors)),
             "weights": torch.from_numpy(weights), "location": torch.from_numpy(location)}
    return entry, state
