"""The lexical view of a synopsis: TF-IDF word n-grams -> a ridge score.

Training fits it with scikit-learn (training/lexical.py); scoring needs only this
module and numpy. The transform re-implements scikit-learn's ``TfidfVectorizer``
(lowercase, token pattern, n-grams, sublinear tf, smoothed idf, L2 norm) so that a
bundle holds no pickle: settings in the manifest, the vocabulary as a JSON list,
idf and ridge weights in safetensors. A test checks it against scikit-learn.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np


VOCABULARY_FILE = "lexical/vocabulary.json"
WEIGHTS_FILE = "lexical/weights.safetensors"
TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's default: words of two or more characters


@dataclass(frozen=True)
class LexicalSettings:
    ngram_max: int = 2
    min_df: int = 2
    alpha: float = 1.0  # ridge
    folds: int = 5  # out-of-fold scores for the rows the fusion head trains on


def word_ngrams(text: str, ngram_max: int) -> list[str]:
    """Lower-cased word 1..ngram_max-grams, as scikit-learn's analyzer='word' builds them
    (whitespace does not matter: tokens are runs of word characters)."""
    tokens = re.findall(TOKEN_PATTERN, text.lower())
    grams = list(tokens)
    for n in range(2, ngram_max + 1):
        grams.extend(" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return grams


class LexicalModel:
    """TF-IDF (sublinear tf, smoothed idf, L2-normalised) of the synopsis, then a ridge regression."""

    def __init__(self, vocabulary: Sequence[str], idf: np.ndarray, coef: np.ndarray, intercept: float,
                 ngram_max: int):
        if not (len(vocabulary) == len(idf) == len(coef)):
            raise ValueError("vocabulary, idf and coef must have the same length")
        self.index = {term: i for i, term in enumerate(vocabulary)}
        self.idf = np.asarray(idf, dtype=np.float64)
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = float(intercept)
        self.ngram_max = int(ngram_max)

    @property
    def vocabulary(self) -> list[str]:
        return list(self.index)  # dicts keep insertion order: index order

    def predict(self, texts: Sequence[Any]) -> np.ndarray:
        """Ridge scores (standardised units), float32 [n]. NULL or empty text scores the intercept."""
        out = np.full(len(texts), self.intercept, dtype=np.float64)
        for row, text in enumerate(texts):
            counts = Counter(j for j in map(self.index.get, word_ngrams(text or "", self.ngram_max))
                             if j is not None)
            if not counts:
                continue
            cols = np.fromiter(counts, dtype=np.int64, count=len(counts))
            tf = 1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64, count=len(counts)))
            weights = tf * self.idf[cols]
            out[row] += float(weights @ self.coef[cols]) / math.sqrt(float(weights @ weights))
        return out.astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {"idf": self.idf, "coef": self.coef, "intercept": np.array([self.intercept])}

    def save(self, directory: Path) -> None:
        """Write the vocabulary into ``directory``; the weights go through the bundle writer (``state``)."""
        path = Path(directory) / VOCABULARY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.vocabulary, ensure_ascii=False))

    @classmethod
    def load(cls, bundle: Path, settings: dict, weights: dict[str, Any]) -> "LexicalModel":
        """The model of a bundle's lexical files (``weights``: those of WEIGHTS_FILE). Raises
        ValueError naming the file and what is wrong with it."""
        path = Path(bundle) / VOCABULARY_FILE
        try:
            vocabulary = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{path}: not a JSON list of strings ({type(exc).__name__})") from None
        if not isinstance(vocabulary, list) or not all(isinstance(t, str) for t in vocabulary):
            raise ValueError(f"{path}: must be a JSON list of strings")
        expected = {"idf": (len(vocabulary),), "coef": (len(vocabulary),), "intercept": (1,)}
        for name, shape in expected.items():
            found = tuple(weights[name].shape) if name in weights else None
            if found != shape:
                raise ValueError(f"{Path(bundle) / WEIGHTS_FILE}: {name} has shape {found}; expected {shape} "
                                 f"({len(vocabulary)} terms in {VOCABULARY_FILE})")
        return cls(vocabulary, weights["idf"].numpy(), weights["coef"].numpy(),
                   float(weights["intercept"][0]), settings["ngram_max"])
