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
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from anime_udf.errors import AnimeUdfError

_CHUNK = 500  # SQLite's bound-parameter limit is 999 on old builds
# A rowid table with the key in its own index: a 1.5 KB vector fits in a 4 KB table page. (A
# WITHOUT ROWID table, the layout of caches before dated entries, keeps at most ~1 KB of a
# row in its page: every vector spilled to an overflow page, 4.7 KB an entry and 3x slower
# look-ups; `prune` rewrites such a cache in this layout.)
_TABLE = ("(encoder TEXT NOT NULL, key TEXT NOT NULL, vector BLOB NOT NULL, written_at REAL,"
          " PRIMARY KEY (encoder, key))")


def cache_dir() -> Path:
    return Path(os.environ.get("ANIME_UDF_CACHE") or Path.home() / ".cache" / "anime-udf")


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _rewrite_without_overflow(con: sqlite3.Connection) -> None:
    """Rewrite a cache table of the old WITHOUT ROWID layout as _TABLE (inside the caller's transaction)."""
    sql = con.execute("SELECT sql FROM sqlite_master WHERE name = 'embeddings'").fetchone()[0]
    if "WITHOUT ROWID" in sql.upper():
        con.execute(f"CREATE TABLE embeddings_new {_TABLE}")
        con.execute("INSERT INTO embeddings_new (encoder, key, vector, written_at) "
                    "SELECT encoder, key, vector, written_at FROM embeddings")
        con.execute("DROP TABLE embeddings")
        con.execute("ALTER TABLE embeddings_new RENAME TO embeddings")


class CacheError(AnimeUdfError):
    """``anime-udf cache`` cannot do what it was asked."""


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
        self.unusable_because = ""  # the error that made it unusable
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _check_private(self.path)
            try:  # created private, and not through a link planted since the check
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            except FileExistsError:
                pass
            with self._connect() as con:
                con.execute("PRAGMA journal_mode=WAL")
                con.execute(f"CREATE TABLE IF NOT EXISTS embeddings {_TABLE}")
                # A cache written before entries were dated: its entries keep a NULL date
                # (older than any --older-than), new ones are dated.
                columns = {row[1] for row in con.execute("PRAGMA table_info(embeddings)")}
                if "written_at" not in columns:
                    con.execute("ALTER TABLE embeddings ADD COLUMN written_at REAL")
            con.close()
        except (sqlite3.Error, OSError, UnsafeCacheError) as exc:
            self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        if self.usable:
            warnings.warn(f"embedding cache {self.path} cannot be used ({exc}); continuing without it",
                          RuntimeWarning, stacklevel=3)
            self.unusable_because = str(exc)
        self.usable = False

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=120)

    def lookup(self, encoder: str, keys: Sequence[str], dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(vectors float32 [len(keys), dim], found bool [len(keys)]) for distinct ``keys``: a
        cached entry that is not ``dim`` finite numbers is not found (to be computed again and
        rewritten), with a warning. Vectorised: no Python per vector."""
        vectors = np.zeros((len(keys), dim), dtype=np.float32)
        found = np.zeros(len(keys), dtype=bool)
        if not self.usable or not keys:
            return vectors, found
        try:
            rows = self._get(encoder, keys)
        except (sqlite3.Error, OSError) as exc:
            self._give_up(exc)
            return vectors, found
        position = {k: i for i, k in enumerate(keys)}
        # SQLite keeps any type in any column: only a blob of the right size can be a vector
        good = [(position[k], blob) for k, blob in rows if isinstance(blob, bytes) and len(blob) == 4 * dim]
        if good:
            at = np.fromiter((i for i, _ in good), dtype=np.int64, count=len(good))
            read = np.frombuffer(b"".join(blob for _, blob in good), dtype=np.float32).reshape(len(good), dim)
            finite = np.isfinite(read).all(axis=1)
            vectors[at[finite]] = read[finite]
            found[at[finite]] = True
        bad = len(rows) - (int(finite.sum()) if good else 0)
        if bad:
            warnings.warn(f"embedding cache {self.path}: {bad} vector(s) not of {dim} finite numbers; computing "
                          "them again", RuntimeWarning, stacklevel=2)
        return vectors, found

    def put(self, encoder: str, vectors: dict[str, np.ndarray]) -> None:
        if not self.usable:
            return
        try:
            self._put(encoder, vectors)
        except (sqlite3.Error, OSError) as exc:
            self._give_up(exc)

    def _get(self, encoder: str, keys: Sequence[str]) -> list[tuple[str, object]]:
        found: list[tuple[str, object]] = []
        con = self._connect()
        try:
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                found.extend(con.execute(
                    f"SELECT key, vector FROM embeddings WHERE encoder = ? AND key IN ({marks})",
                    [encoder, *chunk],
                ))
        finally:
            con.close()
        return found

    def _put(self, encoder: str, vectors: dict[str, np.ndarray]) -> None:
        now = time.time()
        rows = [(encoder, k, np.asarray(v, dtype=np.float32).tobytes(), now) for k, v in vectors.items()]
        with self._connect() as con:  # one transaction: all rows or none
            con.executemany("INSERT OR REPLACE INTO embeddings (encoder, key, vector, written_at) "
                            "VALUES (?, ?, ?, ?)", rows)
        con.close()

    # --- bounding the file (anime-udf cache) ---------------------------------------------

    def require_usable(self) -> None:
        """For the commands that need the cache itself (not only its speed): an unusable one is an error."""
        if not self.usable:
            raise CacheError(f"embedding cache {self.path} cannot be used ({self.unusable_because})")

    @contextmanager
    def _rewriting(self, done: str) -> Iterator[None]:
        """A failure to write the file (``prune``, ``compact``) as a CacheError naming it: SQLite
        opens a file its user may not write read-only and only says so on the first write."""
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            read_only = getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_READONLY  # file or directory
            why = "is read-only, so it " if read_only else ""
            raise CacheError(f"embedding cache {self.path} {why}cannot be {done} ({exc})") from exc

    def size_bytes(self) -> int:
        """The cache file with its write-ahead log."""
        return sum(p.stat().st_size for p in (self.path, self.path.with_name(self.path.name + "-wal"))
                   if p.exists())

    def stats(self) -> list[dict[str, Any]]:
        """One dict per encoder id: entries, bytes of vectors, oldest and newest write (unix
        seconds; None for entries written before dates were kept), most entries first."""
        self.require_usable()
        con = self._connect()
        try:
            rows = con.execute(
                "SELECT encoder, count(*), sum(length(vector)), min(written_at), max(written_at), "
                "count(*) - count(written_at) FROM embeddings GROUP BY encoder ORDER BY count(*) DESC, encoder"
            ).fetchall()
        finally:
            con.close()
        return [{"encoder": e, "entries": n, "vector_bytes": b, "oldest": lo, "newest": hi, "undated": undated}
                for e, n, b, lo, hi, undated in rows]

    def prune(self, *, older_than: float | None = None, encoder: str | None = None,
              dry_run: bool = False) -> dict[str, int]:
        """Remove the entries written more than ``older_than`` seconds ago (undated ones
        included) and/or those of encoder ids starting with ``encoder``; then ``compact``.
        Returns the entries removed (or, with ``dry_run``, that would be) per encoder id."""
        self.require_usable()
        if older_than is None and encoder is None:
            raise CacheError("say what to prune: --older-than AGE and/or --encoder ID")
        conditions, params = [], []
        if older_than is not None:
            conditions.append("(written_at IS NULL OR written_at < ?)")
            params.append(time.time() - older_than)
        if encoder is not None:
            conditions.append("substr(encoder, 1, ?) = ?")
            params.extend([len(encoder), encoder])
        where = " AND ".join(conditions)
        con = self._connect()
        try:
            removed = dict(con.execute(f"SELECT encoder, count(*) FROM embeddings WHERE {where} GROUP BY encoder",
                                       params).fetchall())
            if removed and not dry_run:
                with self._rewriting("pruned"), con:  # one transaction
                    con.execute(f"DELETE FROM embeddings WHERE {where}", params)
        finally:
            con.close()
        if removed and not dry_run:
            self.compact()
        return removed

    def compact(self) -> None:
        """Rewrite the file: the current layout (an older cache's is converted) without the
        space of removed entries."""
        self.require_usable()
        con = self._connect()
        try:
            with self._rewriting("compacted"):
                with con:  # one transaction
                    _rewrite_without_overflow(con)
                con.execute("VACUUM")  # give the space back: the file shrinks
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            con.close()


# --- anime-udf cache ----------------------------------------------------------------------------

def usable_cache() -> EmbeddingCache:
    """The embedding cache the scoring commands use ($ANIME_UDF_CACHE); an unusable one is an error here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the error says it
        cache = EmbeddingCache()
    cache.require_usable()
    return cache


def cache_summary() -> dict[str, Any]:
    """``anime-udf cache``: the file, its size and its entries per encoder id (``EmbeddingCache.stats``)."""
    cache = usable_cache()
    encoders = cache.stats()
    return {"path": str(cache.path), "bytes": cache.size_bytes(), "encoders": encoders}


def format_cache_summary(summary: dict[str, Any]) -> str:
    """``cache_summary`` as ``anime-udf cache`` prints it: the totals, then a line per encoder id."""
    encoders = summary["encoders"]
    total = sum(e["entries"] for e in encoders)
    lines = [f"{summary['path']}: {summary['bytes'] / 1e6:,.1f} MB, {total:,} entries, {len(encoders)} encoder(s)"]
    for e in encoders:
        undated = f", {e['undated']:,} undated" if e["undated"] else ""
        lines.append(f"  {e['entries']:>10,} entries {e['vector_bytes'] / 1e6:>9,.1f} MB  written "
                     f"{_when(e['oldest'])} .. {_when(e['newest'])}{undated}  {e['encoder']}")
    return "\n".join(lines)


def _when(seconds: float | None) -> str:
    import datetime as dt

    return "-" if seconds is None else dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M")


def prune_cache(*, older_than: float | None = None, encoder: str | None = None, dry_run: bool = False) -> str:
    """``anime-udf cache prune`` (``EmbeddingCache.prune``): what it removed, or would, per encoder id,
    and the file's size before and after."""
    cache = usable_cache()
    before = cache.size_bytes()
    removed = cache.prune(older_than=older_than, encoder=encoder or None, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {sum(removed.values()):,} entries" + (":" if removed else "")]
    lines += [f"  {n:>10,}  {enc}" for enc, n in sorted(removed.items(), key=lambda item: -item[1])]
    if not dry_run:
        lines.append(_size_change(cache, before))
    return "\n".join(lines)


def compact_cache() -> str:
    """``anime-udf cache compact`` (``EmbeddingCache.compact``): the file's size before and after."""
    cache = usable_cache()
    before = cache.size_bytes()
    cache.compact()
    return _size_change(cache, before)


def _size_change(cache: EmbeddingCache, before: int) -> str:
    return f"{cache.path}: {before / 1e6:,.1f} MB -> {cache.size_bytes() / 1e6:,.1f} MB"
