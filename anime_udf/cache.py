"""Content-hashed embedding cache: a text is embedded once per text encoder.

One SQLite file (``$ANIME_UDF_CACHE`` or ``~/.cache/anime-udf``) keyed by
(encoder id, sha256 of the text). SQLite gives atomic writes and safe access from
several threads and processes, which DuckDB's parallel UDF calls need.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np

_CHUNK = 500  # SQLite's bound-parameter limit is 999 on old builds


def cache_dir() -> Path:
    return Path(os.environ.get("ANIME_UDF_CACHE") or Path.home() / ".cache" / "anime-udf")


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """A cache that cannot be used (corrupt file, read-only disk) is a warning, not an error:
    scoring goes on without it, only slower."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else cache_dir() / "embeddings.sqlite"
        self.usable = True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as con:
                con.execute("PRAGMA journal_mode=WAL")
                con.execute(
                    "CREATE TABLE IF NOT EXISTS embeddings ("
                    " encoder TEXT NOT NULL, key TEXT NOT NULL, vector BLOB NOT NULL,"
                    " PRIMARY KEY (encoder, key)) WITHOUT ROWID"
                )
            con.close()
        except (sqlite3.Error, OSError) as exc:
            self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        if self.usable:
            warnings.warn(f"embedding cache {self.path} cannot be used ({exc}); continuing without it",
                          RuntimeWarning, stacklevel=3)
        self.usable = False

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=120)

    def get(self, encoder: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
        if not self.usable:
            return {}
        try:
            return self._get(encoder, keys)
        except (sqlite3.Error, OSError) as exc:
            self._give_up(exc)
            return {}

    def put(self, encoder: str, vectors: dict[str, np.ndarray]) -> None:
        if not self.usable:
            return
        try:
            self._put(encoder, vectors)
        except (sqlite3.Error, OSError) as exc:
            self._give_up(exc)

    def _get(self, encoder: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, np.ndarray] = {}
        con = self._connect()
        try:
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = con.execute(
                    f"SELECT key, vector FROM embeddings WHERE encoder = ? AND key IN ({marks})",
                    [encoder, *chunk],
                )
                for key, blob in rows:
                    found[key] = np.frombuffer(blob, dtype=np.float32)
        finally:
            con.close()
        return found

    def _put(self, encoder: str, vectors: dict[str, np.ndarray]) -> None:
        rows = [(encoder, k, np.asarray(v, dtype=np.float32).tobytes()) for k, v in vectors.items()]
        with self._connect() as con:  # one transaction: all rows or none
            con.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)", rows)
        con.close()
