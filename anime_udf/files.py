"""Writing files so that readers never see a partial one, and clearing what a killed writer left."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from anime_udf.errors import AnimeUdfError, OptionError

if TYPE_CHECKING:
    import polars as pl


class OutputError(AnimeUdfError, OSError):
    """An output file cannot be written where it was asked for."""


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; once the block has written it,
    fsync it and rename it over ``path``. On failure the temporary file is removed. A place
    that cannot be written (its folder a file, no permission) is an OutputError before the
    block runs, so that a caller can write its result before it commits anything."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.touch()
    except OSError as exc:
        raise OutputError(f"{path}: cannot write here: {exc.strerror or exc}") from None
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is atomic all the same


def check_out_suffix(out: Path) -> str:
    """A result file's name (``--out``): .parquet, .pq or .csv, checked before any work, so that a bad
    name costs nothing."""
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".pq", ".csv"):
        raise OptionError(f"{out}: use a .parquet or .csv file name", "--out")
    return suffix


def write_result(df: pl.DataFrame, out: Path, before_replace: Callable[[], None] | None = None) -> None:
    """Write a result to .parquet or .csv; readers never see a half-written file.
    ``before_replace`` runs once the file is written, before it takes its name (sql --write commits
    there: the result is saved with the changes, or neither is)."""
    suffix = check_out_suffix(out)
    with atomic_file(out) as tmp:
        if suffix == ".csv":
            df.write_csv(tmp)
        else:
            df.write_parquet(tmp)
        if before_replace is not None:
            before_replace()


def process_running(pid: int) -> bool:
    """Whether process ``pid`` exists: what a killed writer left (named by its pid) may be cleared when not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def pause_at(env: str, phase: str, seconds_env: str, who: str) -> None:
    """A test hook: where ``$env`` names ``phase``, print ``<who>: paused at <phase>`` to stderr and
    sleep ``$seconds_env`` (default an hour), so that a test can kill the process at a known place."""
    if os.environ.get(env) == phase:
        sys.stderr.write(f"{who}: paused at {phase} (pid {os.getpid()})\n")
        sys.stderr.flush()
        time.sleep(float(os.environ.get(seconds_env) or 3600))
