"""Fitting the fusion model's lexical view (TF-IDF n-grams -> ridge) with scikit-learn.

The fusion head learns how far to trust the lexical score, so the scores it trains on
must be like those it will see on new rows: out-of-fold, never in-sample (an in-sample
ridge over ~80k n-grams nearly memorises its training targets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold

from anime_udf.lexical import TOKEN_PATTERN, LexicalModel


@dataclass(frozen=True)
class LexicalSettings:
    """How the lexical view is fitted (recorded in the manifest's ``lexical``; scoring reads
    only ``ngram_max``)."""

    ngram_max: int = 2
    min_df: int = 2
    alpha: float = 1.0  # ridge
    folds: int = 5  # out-of-fold scores for the rows the fusion head trains on


def fit_lexical(texts: Sequence[str], y: np.ndarray, settings: LexicalSettings) -> LexicalModel:
    """Fit TF-IDF + ridge on ``texts`` (already cleaned) -> standardised scores ``y``."""
    vectorizer = TfidfVectorizer(lowercase=True, token_pattern=TOKEN_PATTERN, ngram_range=(1, settings.ngram_max),
                                 min_df=min(settings.min_df, len(texts)), sublinear_tf=True, norm="l2",
                                 smooth_idf=True, dtype=np.float64)
    x = vectorizer.fit_transform(texts)
    ridge = Ridge(alpha=settings.alpha).fit(x, y)
    vocabulary = vectorizer.get_feature_names_out()  # in column order
    return LexicalModel(list(vocabulary), vectorizer.idf_, ridge.coef_, float(ridge.intercept_), settings.ngram_max)


def out_of_fold(texts: Sequence[str], y: np.ndarray, settings: LexicalSettings, seed: int) -> np.ndarray:
    """Each row's lexical score from a model fitted on the other folds (vocabulary included)."""
    texts = list(texts)
    scores = np.zeros(len(texts), dtype=np.float32)
    folds = KFold(n_splits=min(settings.folds, len(texts)), shuffle=True, random_state=seed)
    for fit_rows, held_rows in folds.split(texts):
        model = fit_lexical([texts[i] for i in fit_rows], y[fit_rows], settings)
        scores[held_rows] = model.predict([texts[i] for i in held_rows])
    return scores
