"""What every rescore run has, on either engine: its errors, its id and clock, and the test
hook that pauses it at a known place.

Test hook: ``ANIME_UDF_RESCORE_PAUSE_AT=<phase>`` (plan, score, commit, export) makes a run
print ``rescore: paused at <phase>`` to stderr and sleep ``ANIME_UDF_RESCORE_PAUSE_SECONDS``
(default 3600) at that point, so that a test can ``kill -9`` it at a known place: ``score``
is after the first scored chunk, ``commit`` inside the transaction just before COMMIT (on
Spark: the snapshot written, not yet published), ``export`` before the rename.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from anime_udf.errors import EXIT_BUSY, AnimeUdfError
from anime_udf.files import pause_at

PAUSE_ENV = "ANIME_UDF_RESCORE_PAUSE_AT"
PAUSE_SECONDS_ENV = "ANIME_UDF_RESCORE_PAUSE_SECONDS"


class RescoreError(AnimeUdfError, RuntimeError):
    """A rescore run cannot start or cannot finish; the store is left as it was."""


class StoreBusyError(RescoreError):
    """Another process holds the store, or the database of a --catalog FILE.duckdb:TABLE."""

    exit_code = EXIT_BUSY


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Run:
    """One run: what it works on (recorded in its run record, the rows of rescore_runs), when it
    started, and its id (``20261129T210000Z-a1b2c3``: runs sort by time)."""

    store: Path
    catalog: str  # how messages and records name the catalog
    key: str  # the catalog column the store is keyed by
    level: float | None = None  # the level of the intervals it stores; None: it computes none
    started: dt.datetime = field(default_factory=now)
    clock: float = field(default_factory=time.perf_counter)  # for the run's seconds
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or self.started.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)
        if self.level is not None and not 0 < self.level < 1:
            raise RescoreError(f"the level {self.level} is not between 0 and 1 (0.9 for 90 % intervals)")

    def seconds(self) -> float:
        return round(time.perf_counter() - self.clock, 3)


def pause(phase: str) -> None:
    """The test hook of the module docstring."""
    pause_at(PAUSE_ENV, phase, PAUSE_SECONDS_ENV, "rescore")
