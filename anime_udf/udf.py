"""Registering the models as DuckDB SQL functions (vectorised Arrow UDFs)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
from duckdb.sqltypes import DOUBLE, VARCHAR

from anime_udf.errors import AnimeUdfError
from anime_udf.registry import models_dir, newest
from anime_udf.scoring import Scorer, load_scorer

FUNCTION_NAMES = {"baseline": "predict_score", "fusion": "predict_score_fusion"}


class NoModelsError(AnimeUdfError, LookupError):
    """register() found no bundle to register."""


def arrow_udf(scorer: Scorer):
    """A DuckDB Arrow UDF (synopsis, genres, studio, episodes) -> DOUBLE for ``scorer``."""

    def predict(synopsis, genres, studio, episodes) -> pa.Array:
        # DuckDB flattens a constant argument beside varying ones; when all four are
        # constant it calls once with one row and repeats the result for every row.
        columns = [c.to_pylist() for c in (synopsis, genres, studio, episodes)]
        return pa.array(scorer.predict(*columns), type=pa.float64())

    return predict


def register_scorer(con: duckdb.DuckDBPyConnection, scorer: Scorer, name: str | None = None) -> str:
    name = name or FUNCTION_NAMES[scorer.kind]
    try:
        con.remove_function(name)
    except duckdb.Error:
        pass  # nothing registered under that name yet
    con.create_function(
        name,
        arrow_udf(scorer),
        [VARCHAR, VARCHAR, VARCHAR, DOUBLE],
        DOUBLE,
        type="arrow",
        null_handling="special",  # NULL inputs are missing values, scored per the NULL policy
        side_effects=False,
    )
    return name


def register(
    con: duckdb.DuckDBPyConnection,
    baseline: Path | str | None = None,
    fusion: Path | str | None = None,
    models: Path | str | None = None,
    device: str = "auto",
) -> dict[str, Scorer]:
    """Register ``predict_score`` (baseline) and ``predict_score_fusion`` on ``con``.

    Without explicit bundle paths, the newest bundle of each kind in the models
    directory (``models``, ``$ANIME_UDF_MODELS`` or ``./models``) is used. ``device``
    runs the text encoder: ``auto`` (a CUDA GPU when present, else the CPU), ``cpu``
    or ``cuda``. Returns {function name: scorer}.
    """
    paths = {"baseline": baseline, "fusion": fusion}
    if baseline is None and fusion is None:
        paths = {kind: newest(kind, models) for kind in paths}
    registered = {}
    for path in paths.values():
        if path is not None:
            scorer = load_scorer(path, device=device)
            registered[register_scorer(con, scorer)] = scorer
    if not registered:
        raise NoModelsError(
            f"no model bundles in {models_dir(models).resolve()}; train one with "
            f"`anime-udf train baseline --data CATALOG`, or pass --models DIR"
        )
    return registered
