"""Writing files so that readers never see a partial one, and clearing what a killed writer left."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from anime_udf.errors import AnimeUdfError


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


def process_running(pid: int) -> bool:
    """Whether process ``pid`` exists: what a killed writer left (named by its pid) may be cleared when not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
