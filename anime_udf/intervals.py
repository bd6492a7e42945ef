"""Prediction intervals: normalised split conformal prediction (docs/intervals.md).

A trainer keeps, from the selection run's validation rows (the newest years by default: out of
time, as the nightly job scores), each row's absolute error |y - ŷ| and a *scale* σ(x) for the
row: how wide its errors run, from what the model knows about it (``scale_feature_names``). Errors
also lean: titles scored low tend to be better than their score, those scored high worse, so
the interval is centred at ŷ + m(x), m a least-squares line of y - ŷ on the score and its square.
The interval at level α is ŷ + m(x) ± q_α σ(x), q_α the ⌈(n+1)α⌉-th smallest of the n
calibration rows' normalised errors |y - ŷ - m(x)| / σ(x), widened where needed to hold ŷ; the
scores are kept whole, so every level is served exactly.

σ(x) = exp(w · φ(x)), a Gamma regression of |y - ŷ| with a log link, fitted on the calibration
rows themselves (training/calibration.py: each row's normalised error uses a fit on the other
folds, so that no row's error shrinks its own interval).

On the model floor: numpy only; the bundle's file is read by ``Calibration.load``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anime_udf.bundle import CALIBRATION_FILE, BundleError, load_weights
from anime_udf.errors import AnimeUdfError
from anime_udf.columns import SCORE_MAX, SCORE_MIN
from anime_udf.features import EPISODE_COLUMNS, GENRE_COLUMNS

# What the scale model reads of a row, each known wherever the point score is computed; then one
# indicator per genre of the bundle's vocabulary (fusion's errors on the time split's calibration
# rows run from 0.32 on Kids titles to 0.80 on Horror ones: docs/experiments.md, "Prediction intervals"):
SCALE_FEATURES = (
    "constant",
    "score",             # the standardised point score, and its square: errors differ by band
    "score_squared",
    "seed_spread",       # the seed ensemble's disagreement (standard deviation, standardised)
    "unknown_studio",    # a studio the model never saw (or NULL)
    "episodes",          # scaled log episodes (0: missing) and the missing flag
    "episodes_missing",
    "genres",            # how many known genres the row has
    "synopsis_words",    # log(1 + words of the synopsis)
    "lexical",           # fusion: the lexical view's score and its distance from the point
    "lexical_distance",
)
LOCATION_FEATURES = 3  # the centre's shift m(x) reads the first three: constant, score, score squared
SCALE_CLIP = 3.0  # log σ kept within ±3 of its mean: no row's interval collapses or explodes


class NoCalibrationError(AnimeUdfError, LookupError):
    """An interval was asked of a bundle trained before intervals existed."""


class LevelError(AnimeUdfError, ValueError):
    """A level outside (0, 1), NULL or not finite."""


def check_levels(level: Sequence[Any] | np.ndarray) -> np.ndarray:
    """``level`` as float64, every value in (0, 1); else one clear error naming the bad value."""
    values = np.array([np.nan if v is None else v for v in level], dtype=np.float64)
    bad = ~((values > 0) & (values < 1))  # NaN (NULL) fails both comparisons
    if bad.any():
        found = level[int(np.argmax(bad))]
        shown = "NULL" if found is None else "NaN" if math.isnan(found) else repr(found)
        raise LevelError(f"level must be a number strictly between 0 and 1 (0.9 for a 90 % interval); got {shown}")
    return values


def has_calibration(manifest: dict[str, Any]) -> bool:
    """Whether a bundle's manifest has a calibration (bundles trained before intervals have none)."""
    return isinstance(manifest.get("calibration"), dict)


def scale_feature_names(genres: Sequence[str]) -> list[str]:
    """The scale model's features for a bundle of genre vocabulary ``genres``."""
    return [*SCALE_FEATURES, *(f"genre:{g}" for g in genres)]


def word_counts(cleaned_synopsis: Sequence[str]) -> np.ndarray:
    """The words of each synopsis, float64, from the synopses as ``features.clean_text`` leaves
    them (one space between words): ``len(s.split())`` of each original, without splitting."""
    return np.fromiter((t.count(" ") + 1 if t else 0 for t in cleaned_synopsis), dtype=np.float64,
                       count=len(cleaned_synopsis))


def scale_features(members: np.ndarray, point: np.ndarray, dense: np.ndarray, studio_index: np.ndarray,
                   cleaned_synopsis: Sequence[str], lexical: np.ndarray | None) -> np.ndarray:
    """φ(x), float64 [rows, features] (``scale_feature_names``): ``members`` the seed heads'
    standardised predictions [seeds, rows], ``point`` the standardised point (after the blend),
    ``dense`` the bundle's dense tabular features, ``studio_index`` the model's studio index (0:
    a studio it never saw), ``cleaned_synopsis`` the synopses cleaned (``features.clean_text``),
    ``lexical`` the lexical score (fusion; None: zeros)."""
    n = len(point)
    point = np.asarray(point, dtype=np.float64)
    words = word_counts(cleaned_synopsis)
    lexical_score = np.zeros(n) if lexical is None else np.asarray(lexical, dtype=np.float64)
    columns = [
        np.ones(n), point, point ** 2,
        np.std(np.asarray(members, dtype=np.float64), axis=0) if len(members) > 1 else np.zeros(n),
        (np.asarray(studio_index) == 0).astype(np.float64),
        dense[:, EPISODE_COLUMNS.start].astype(np.float64), dense[:, EPISODE_COLUMNS.start + 1].astype(np.float64),
        dense[:, GENRE_COLUMNS].sum(axis=1, dtype=np.float64),
        np.log1p(words),
        lexical_score, np.zeros(n) if lexical is None else np.abs(lexical_score - point),
    ]
    return np.column_stack([*columns, dense[:, GENRE_COLUMNS].astype(np.float64)])


def log_scale(weights: np.ndarray, features: np.ndarray, centre: float) -> np.ndarray:
    """log σ(x) (score units), kept within ``SCALE_CLIP`` of ``centre`` (the calibration rows' mean)."""
    return np.clip(features @ weights, centre - SCALE_CLIP, centre + SCALE_CLIP)


def conformal_quantile(sorted_scores: np.ndarray, level: np.ndarray) -> np.ndarray:
    """The ⌈(n+1)α⌉-th smallest score for each level α (inf where that exceeds n: the interval is
    then everything). Split conformal coverage is at least ⌈(n+1)α⌉/(n+1) for exchangeable rows."""
    n = len(sorted_scores)
    rank = np.ceil((n + 1) * level - 1e-9).astype(np.int64)  # 1e-9: 0.9 x 1001 is 900.9000000000001
    padded = np.append(sorted_scores, np.inf)
    return padded[np.clip(rank, 1, n + 1) - 1]


def guaranteed_coverage(rows: int, level: float) -> float:
    """The coverage split conformal promises at ``level`` from ``rows`` exchangeable calibration rows."""
    return min(1.0, math.ceil((rows + 1) * level - 1e-9) / (rows + 1))


@dataclass(frozen=True)
class Calibration:
    """A bundle's calibration: the calibration rows' normalised errors (sorted), their absolute
    errors |y - ŷ| (sorted: the constant-width reference), the scale model's weights and the
    centre's shift's."""

    scores: np.ndarray  # |y - ŷ - m(x)| / σ(x), sorted
    errors: np.ndarray  # |y - ŷ|, sorted
    weights: np.ndarray  # log σ over scale_feature_names(the bundle's genres)
    location: np.ndarray  # m over the first LOCATION_FEATURES scale features
    centre: float  # the calibration rows' mean log σ

    @classmethod
    def load(cls, bundle: Path, manifest: dict[str, Any]) -> "Calibration":
        entry = manifest.get("calibration")
        if not has_calibration(manifest):
            raise NoCalibrationError(
                f"{bundle}: this bundle has no calibration (it was trained before prediction intervals); "
                f"retrain it with `anime-udf train {manifest['kind']}` to score intervals")
        state = {k: v.numpy().astype(np.float64) for k, v in load_weights(bundle, CALIBRATION_FILE).items()}
        try:
            scores, errors, weights, location = state["scores"], state["errors"], state["weights"], state["location"]
        except KeyError as exc:
            raise BundleError(f"{bundle / CALIBRATION_FILE}: no tensor {exc}") from None
        features = len(scale_feature_names(manifest["features"]["genres"]))
        if (weights.shape != (features,) or location.shape != (LOCATION_FEATURES,) or scores.ndim != 1
                or errors.shape != scores.shape or len(scores) == 0 or (np.diff(scores) < 0).any()
                or (np.diff(errors) < 0).any() or scores[0] < 0 or errors[0] < 0):
            raise BundleError(f"{bundle / CALIBRATION_FILE}: expected sorted non-negative scores and errors of "
                              f"one length, {features} scale weights and {LOCATION_FEATURES} location weights")
        return cls(scores, errors, weights, location, float(entry["log_scale_centre"]))

    @property
    def rows(self) -> int:
        return len(self.scores)

    def bounds(self, score: np.ndarray, features: np.ndarray, level: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) of each row's interval at its level around its ``score`` (score units), in [1, 10]."""
        centre = score + features[:, :LOCATION_FEATURES] @ self.location
        half = conformal_quantile(self.scores, level) * np.exp(log_scale(self.weights, features, self.centre))
        return (np.clip(np.minimum(centre - half, score), SCORE_MIN, SCORE_MAX),
                np.clip(np.maximum(centre + half, score), SCORE_MIN, SCORE_MAX))

    def constant_half_width(self, level: float) -> float:
        """The constant-width reference calibrated on the same rows: the conformal quantile of |y - ŷ|."""
        return float(conformal_quantile(self.errors, np.array([level]))[0])
