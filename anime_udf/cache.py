"""Content-hashed embedding cache: a text is embedded once per text encoder.

One SQLite file (``$ANIME_UDF_CACHE`` or ``~/.cache/anime-udf``) keyed by
(encoder id, sha256 of the text). SQLite gives atomic writes and safe access from
several threads and processes, which DuckDB's parallel UDF calls need.

What it trusts: its owner. A cache file or directory other users may write, or a cache
file that is a symbolic link, is not used. A vector read back must have the encoder's
width and finite values, or it is computed again and rewritten; a vector of the right
width planted by the owner is taken as it is.
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


class UnsafeCacheError(Exception):
    """A cache location that others could write to, or that leads elsewhere."""


def _check_private(path: Path) -> None:
    """Only the owner may write the cache: no symlinked file, nothing writable by group or others."""
    if path.is_symlink():
        raise UnsafeCacheError(f"{path} is a symbolic link; the cache is never written through one")
    for p in (path.parent, path):
        if p.exists() and p.stat().st_mode & 0o022:
            raise UnsafeCacheError(f"{p} is writable by other users (mode {p.stat().st_mode & 0o777:o}); "
                                   f"make it private: chmod go-w {p}")


class EmbeddingCache:
    """A cache that cannot be used (corrupt file, read-only disk, writable by others) is a
    warning, not an error: scoring goes on without it, only slower."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else cache_dir() / "embeddings.sqlite"
        self.usable = True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _check_private(self.path)
            try:  # created private, and not through a link planted since the check
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            except FileExistsError:
                pass
            with self._connect() as con:
                con.execute("PRAGMA journal_mode=WAL")
                con.execute(
                    "CREATE TABLE IF NOT EXISTS embeddings ("
                    " encoder TEXT NOT NULL, key TEXT NOT NULL, vector BLOB NOT NULL,"
                    " PRIMARY KEY (encoder, key)) WITHOUT ROWID"
                )
            con.close()
        except (sqlite3.Error, OSError, UnsafeCacheError) as exc:
            self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        if self.usable:
            warnings.warn(f"embedding cache {self.path} cannot be used ({exc}); continuing without it",
                          RuntimeWarning, stacklevel=3)
        self.usable = False

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=120)

    def get(self, encoder: str, keys: Iterable[str], dim: int) -> dict[str, np.ndarray]:
        """The cached vectors of ``keys`` that are ``dim`` finite numbers; any other entry is
        left out (to be computed again and rewritten), with a warning."""
        if not self.usable:
            return {}
        try:
            found = self._get(encoder, keys)
        except (sqlite3.Error, OSError) as exc:
            self._give_up(exc)
            return {}
        vectors = {k: np.frombuffer(blob, dtype=np.float32) for k, blob in found.items()
                   if isinstance(blob, bytes) and len(blob) == 4 * dim}  # SQLite keeps any type in any column
        good = {k: v for k, v in vectors.items() if np.isfinite(v).all()}
        if len(good) < len(found):
            warnings.warn(f"embedding cache {self.path}: {len(found) - len(good)} vector(s) not of {dim} finite "
                          "numbers; computing them again", RuntimeWarning, stacklevel=2)
        return good

    def put(self, encoder: str, vectors: dict[str, np.ndarray]) -> None:
        if not self.usable:
            return
        try:
            self._put(encoder, vectors)
        except (sqlite3.Error, OSError) as exc:
            self._give_up(exc)

    def _get(self, encoder: str, keys: Iterable[str]) -> dict[str, object]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, object] = {}
        con = self._connect()
        try:
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = con.execute(
                    f"SELECT key, vector FROM embeddings WHERE encoder = ? AND key IN ({marks})",
                    [encoder, *chunk],
                )
                found.update(rows)
        finally:
            con.close()
        return found

    def _put(self, encoder: str, vectors: dict[str, np.ndarray]) -> None:
        rows = [(encoder, k, np.asarray(v, dtype=np.float32).tobytes()) for k, v in vectors.items()]
        with self._connect() as con:  # one transaction: all rows or none
            con.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)", rows)
        con.close()
