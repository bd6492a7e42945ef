"""The lexical view of a synopsis: TF-IDF word n-grams -> a ridge score.

Training fits it with scikit-learn (training/lexical.py); scoring needs only this
module, numpy and polars. The transform re-implements scikit-learn's ``TfidfVectorizer``
(lowercase, token pattern, n-grams, sublinear tf, smoothed idf, L2 norm) so that a
bundle holds no pickle: settings in the manifest, the vocabulary as a JSON list,
idf and ridge weights in safetensors. A test checks it against scikit-learn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl

from anime_udf.bundle import LEXICAL_VOCABULARY_FILE, LEXICAL_WEIGHTS_FILE, shape_mismatch


TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's default: words of two or more characters
# The same tokens (maximal runs of two or more word characters), as polars' Rust regex reads
# them: Python's \w is exactly [\p{L}\p{N}_] on every character its Unicode database assigns
# (tests/test_lexical.py checks them all), and polars lower-cases as str.lower does.
WORD_RUNS = r"[\p{L}\p{N}_]{2,}"


def lower_tokens(texts: Sequence[Any]) -> pl.Series:
    """Each text's tokens, as ``re.findall(TOKEN_PATTERN, text.lower())`` finds them (a list
    per text; NULL for a NULL text)."""
    return pl.Series(texts, dtype=pl.String).str.to_lowercase().str.extract_all(WORD_RUNS)


class LexicalModel:
    """TF-IDF (sublinear tf, smoothed idf, L2-normalised) of the synopsis, then a ridge regression.

    The transform is vectorised over a batch (polars and numpy, no Python per token): the
    tokens of every text at once, then each n-gram is looked up by the code of its words
    (word ids in base ``len(words) + 1``), so no n-gram string is ever built."""

    def __init__(self, vocabulary: Sequence[str], idf: np.ndarray, coef: np.ndarray, intercept: float,
                 ngram_max: int):
        if not (len(vocabulary) == len(idf) == len(coef)):
            raise ValueError("vocabulary, idf and coef must have the same length")
        self.index = {term: i for i, term in enumerate(vocabulary)}
        self.idf = np.asarray(idf, dtype=np.float64)
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = float(intercept)
        self.ngram_max = int(ngram_max)
        # A term is its words joined by single spaces (tokens hold no spaces): every word of
        # every term gets an id, so an n-gram whose words are known has a code to look up.
        terms = {term: term.split(" ") for term in self.index}
        self.word_ids = {w: i for i, w in enumerate(dict.fromkeys(w for words in terms.values() for w in words))}
        self.base = len(self.word_ids) + 1
        if self.base ** max(self.ngram_max, 1) >= 2**63:
            raise ValueError(f"{len(self.word_ids)} words and {self.ngram_max}-grams: n-gram codes overflow int64")
        self.words = pl.Enum(list(self.word_ids))  # a token cast to it is its word id, or NULL
        # A term of one word, by its word id (-1: the word is only in longer terms)
        self.unigrams = np.full(len(self.word_ids), -1, dtype=np.int64)
        for term, words in terms.items():
            if len(words) == 1:
                self.unigrams[self.word_ids[words[0]]] = self.index[term]
        # n -> (codes, term index): a term of n > 1 words, by the code of its word ids
        self.codes: dict[int, tuple[pl.Series, pl.Series]] = {}
        for n in range(2, self.ngram_max + 1):
            found = {self._code([self.word_ids[w] for w in words]): self.index[term]
                     for term, words in terms.items() if len(words) == n}
            self.codes[n] = (pl.Series(list(found), dtype=pl.Int64), pl.Series(list(found.values()), dtype=pl.Int64))

    def _code(self, ids: Sequence[int]) -> int:
        code = 0
        for i in ids:
            code = code * self.base + i
        return code

    @property
    def vocabulary(self) -> list[str]:
        return list(self.index)  # dicts keep insertion order: index order

    def predict(self, texts: Sequence[Any]) -> np.ndarray:
        """Ridge scores (standardised units), float32 [n]. NULL or empty text scores the intercept."""
        n = len(texts)
        rows, terms = self._term_hits(texts)
        out = np.full(n, self.intercept, dtype=np.float64)
        if len(terms):
            # Count each (row, term) once: tf = 1 + log(count), as TfidfVectorizer(sublinear_tf=True).
            # (numpy's default sort of int64 is vectorised: 3.5x faster here than its stable sort)
            shift = len(self.idf).bit_length()  # (row, term) as one int64: row << shift | term
            pairs = np.sort(rows << shift | terms)
            first = np.flatnonzero(np.diff(pairs, prepend=-1))
            counts = np.diff(np.append(first, len(pairs)))
            rows, terms = pairs[first] >> shift, pairs[first] & ((1 << shift) - 1)
            weights = (1.0 + np.log(counts)) * self.idf[terms]
            dot = np.bincount(rows, weights * self.coef[terms], minlength=n)
            norm = np.sqrt(np.bincount(rows, weights * weights, minlength=n))
            hit = norm > 0
            out[hit] += dot[hit] / norm[hit]
        return out.astype(np.float32)

    def _term_hits(self, texts: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """(row, term index) of every word n-gram of ``texts`` that is in the vocabulary, as
        scikit-learn's analyzer='word' builds them: lower-cased tokens of TOKEN_PATTERN, then
        1..ngram_max-grams (whitespace does not matter: tokens are runs of word characters)."""
        tokens = (pl.DataFrame({"word": lower_tokens(texts)}).with_row_index("row")
                  .explode("word").drop_nulls("word"))
        row = tokens["row"].cast(pl.Int64).to_numpy()
        ids = tokens["word"].cast(self.words, strict=False).to_physical().cast(pl.Int64).fill_null(-1).to_numpy()
        known = ids >= 0
        term = self.unigrams[ids[known]]
        found_rows, found_terms = [row[known][term >= 0]], [term[term >= 0]]
        for n, (codes, terms) in self.codes.items():
            # the n-grams starting at each token but the last n - 1: their words as slices of ids
            ends = len(ids) - n + 1
            known = row[:ends] == row[n - 1:]  # all n words in one row
            code = np.zeros(max(ends, 0), dtype=np.int64)
            for k in range(n):
                word = ids[k:k + ends]
                known &= word >= 0
                code = code * self.base + word
            term = pl.Series(code[known]).replace_strict(codes, terms, default=-1, return_dtype=pl.Int64).to_numpy()
            found_rows.append(row[:ends][known][term >= 0])
            found_terms.append(term[term >= 0])
        return np.concatenate(found_rows), np.concatenate(found_terms)

    def state(self) -> dict[str, np.ndarray]:
        return {"idf": self.idf, "coef": self.coef, "intercept": np.array([self.intercept])}

    def save(self, directory: Path) -> None:
        """Write the vocabulary into ``directory``; the weights go through the bundle writer (``state``)."""
        path = Path(directory) / LEXICAL_VOCABULARY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.vocabulary, ensure_ascii=False))

    @classmethod
    def load(cls, bundle: Path, settings: dict, weights: dict[str, Any]) -> "LexicalModel":
        """The model of a bundle's lexical files (``weights``: those of LEXICAL_WEIGHTS_FILE). Raises
        ValueError naming the file and what is wrong with it."""
        path = Path(bundle) / LEXICAL_VOCABULARY_FILE
        try:
            vocabulary = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{path}: not a JSON list of strings ({type(exc).__name__})") from None
        if not isinstance(vocabulary, list) or not all(isinstance(t, str) for t in vocabulary):
            raise ValueError(f"{path}: must be a JSON list of strings")
        expected = {"idf": (len(vocabulary),), "coef": (len(vocabulary),), "intercept": (1,)}
        bad = shape_mismatch(weights, expected)
        if bad:
            raise ValueError(f"{Path(bundle) / LEXICAL_WEIGHTS_FILE}: {bad} "
                             f"({len(vocabulary)} terms in {LEXICAL_VOCABULARY_FILE})")
        return cls(vocabulary, weights["idf"].numpy(), weights["coef"].numpy(),
                   float(weights["intercept"][0]), settings["ngram_max"])
