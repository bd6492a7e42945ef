"""Tabular feature encoding and the NULL policy, shared by training and scoring.

NULL policy (docs/DESIGN.md): NULL synopsis -> empty text; NULL genres -> none; NULL,
empty or unseen studio -> the unknown studio (index 0); NULL, NaN, negative or fractional
episodes -> missing (imputed with the training mean, with a flag); ±inf is missing too, and huge
counts are capped. Genre names are
matched without regard to case or surrounding spaces; unknown names are ignored.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from anime_udf.catalog import not_whole

# Episode counts are log-scaled; this caps absurd values (1e12 episodes) at a sane range.
MAX_LOG_EPISODES = math.log1p(10_000)


def clean_text(value: Any) -> str:
    """The synopsis as the text encoder sees it: NULL -> '', whitespace collapsed."""
    if value is None:
        return ""
    return " ".join(str(value).split())


def parse_genres(value: Any) -> list[str]:
    """'Action, sci-fi ,' -> ['action', 'sci-fi']."""
    if value is None:
        return []
    return [g.strip().casefold() for g in str(value).split(",") if g.strip()]


def studio_key(value: Any) -> str:
    return "" if value is None else " ".join(str(value).split()).casefold()


def log_episodes(value: Any) -> float | None:
    """log1p(episodes), capped, or None when missing (NULL, NaN, ±inf, negative, a fraction)."""
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(x) or x < 0 or not_whole(x):  # as the catalog reader reads them
        return None
    return min(math.log1p(x), MAX_LOG_EPISODES)


def distinct_values(values: Sequence[Any]) -> tuple[list[Any], np.ndarray]:
    """(the distinct values in order of first occurrence, each row's index into them)."""
    index: dict[Any, int] = {}
    rows = np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int64, count=len(values))
    return list(index), rows


# The dense features' columns: scaled log episodes and its missing flag, then one per genre.
EPISODE_COLUMNS = slice(0, 2)
GENRE_COLUMNS = slice(2, None)


@dataclass(frozen=True)
class TabularEncoder:
    """Genres multi-hot, studio index (0 = unknown), scaled episodes + missing flag."""

    genres: tuple[str, ...]
    studios: tuple[str, ...]
    episodes_mean: float
    episodes_std: float

    @classmethod
    def fit(
        cls,
        genres: Sequence[Any],
        studios: Sequence[Any],
        episodes: Sequence[Any],
        min_studio_count: int = 2,
    ) -> "TabularEncoder":
        genre_names = sorted({g for value in genres for g in parse_genres(value)})
        counts = Counter(studio_key(s) for s in studios)
        studio_names = sorted(k for k, n in counts.items() if k and n >= min_studio_count)
        logs = [x for x in map(log_episodes, episodes) if x is not None]
        mean = float(np.mean(logs)) if logs else 0.0
        std = float(np.std(logs)) if len(logs) > 1 else 1.0
        return cls(tuple(genre_names), tuple(studio_names), mean, std or 1.0)

    @property
    def n_studios(self) -> int:
        """Number of studio indices, the unknown studio included."""
        return len(self.studios) + 1

    @property
    def n_tabular(self) -> int:
        """Width of the dense tabular features (episodes, missing flag, genres)."""
        return 2 + len(self.genres)

    def encode(
        self, genres: Sequence[Any], studios: Sequence[Any], episodes: Sequence[Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return (dense float32 [n, 2 + n_genres], studio index int64 [n])."""
        n = len(genres)
        dense = np.zeros((n, self.n_tabular), dtype=np.float32)
        genre_index = {g: i + GENRE_COLUMNS.start for i, g in enumerate(self.genres)}
        studio_index = {s: i + 1 for i, s in enumerate(self.studios)}
        # Catalog columns repeat a few hundred values: each distinct value is parsed once.
        values, rows = distinct_values(episodes)
        logs = np.array([np.nan if x is None else x for x in map(log_episodes, values)], dtype=np.float64)
        missing = np.isnan(logs)[rows]
        dense[:, 0] = np.where(missing, 0.0, (logs[rows] - self.episodes_mean) / self.episodes_std)
        dense[:, 1] = missing  # the missing flag; the scaled value stays at the mean (0)
        values, rows = distinct_values(genres)
        multi_hot = np.zeros((len(values), self.n_tabular), dtype=np.float32)
        for i, value in enumerate(values):
            for g in parse_genres(value):
                col = genre_index.get(g)
                if col is not None:
                    multi_hot[i, col] = 1.0
        dense[:, GENRE_COLUMNS] = multi_hot[rows, GENRE_COLUMNS]
        values, rows = distinct_values(studios)
        studio = np.array([studio_index.get(studio_key(v), 0) for v in values], dtype=np.int64)[rows]
        return dense, studio.reshape(n)

    def to_manifest(self) -> dict:
        return {
            "genres": list(self.genres),
            "studios": list(self.studios),
            "episodes_log_mean": self.episodes_mean,
            "episodes_log_std": self.episodes_std,
        }

    @classmethod
    def from_manifest(cls, data: dict) -> "TabularEncoder":
        return cls(
            tuple(data["genres"]),
            tuple(data["studios"]),
            float(data["episodes_log_mean"]),
            float(data["episodes_log_std"]),
        )
