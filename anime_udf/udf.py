"""Registering the models as DuckDB SQL functions (vectorised Arrow UDFs)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import duckdb
import numpy as np
import pyarrow as pa
from duckdb.sqltypes import DOUBLE, VARCHAR

from anime_udf.bundle import read_manifest
from anime_udf.devices import DEVICES, PRECISIONS, check_choice, resolve_device
from anime_udf.errors import AnimeUdfError, OptionError
from anime_udf.explain import arrow_struct, fields
from anime_udf.registry import get_model, no_bundle_message, resolve_each_kind
from anime_udf.text import encoder_batch_size, text_encoder_dirs

if TYPE_CHECKING:
    from anime_udf.catalog import DatabaseTable
    from anime_udf.intervals import Calibration
    from anime_udf.scoring import Scorer

T = TypeVar("T")

FUNCTION_NAMES = {"baseline": "predict_score", "fusion": "predict_score_fusion"}
# Registered beside each scoring function: its score's exact Shapley parts (anime_udf.explain),
# and its prediction interval at a level (anime_udf.intervals).
EXPLAIN_NAMES = {"baseline": "explain_score", "fusion": "explain_score_fusion"}
INTERVAL_NAMES = {"baseline": "predict_score_interval", "fusion": "predict_score_fusion_interval"}
INTERVAL_FIELDS = ("lo", "hi")


class NoModelsError(AnimeUdfError, LookupError):
    """register() found no bundle to register, or a query calls the function of a kind without one."""


class LazyScorer:
    """A model as registered: its bundle is checked now (manifest, every file's checksum, the
    text encoder's identity: a few hashes) and loaded on the first call, so that registering
    takes milliseconds and imports neither torch nor transformers."""

    def __init__(self, bundle: Path | str, device: str = "auto", precision: str = "auto",
                 manifest: dict[str, Any] | None = None):
        check_choice("device", device, DEVICES)
        check_choice("precision", precision, PRECISIONS)
        if device == "cuda":
            resolve_device(device)  # a GPU asked for by name must be there now, not at the first query
        encoder_batch_size()  # a bad $ANIME_UDF_ENCODER_BATCH is said now, not inside the first query
        self.path = Path(bundle)
        self.manifest = manifest if manifest is not None else read_manifest(self.path)
        text_encoder_dirs(self.path, self.manifest)
        self.kind = self.manifest["kind"]
        self.name = self.manifest.get("name", self.path.name)
        self.device, self.precision = device, precision
        self._scorer: Scorer | None = None
        self._lock = threading.Lock()  # DuckDB may make the first calls from several threads at once

    @property
    def loaded(self) -> bool:
        return self._scorer is not None

    def scorer(self) -> Scorer:
        with self._lock:
            if self._scorer is None:
                from anime_udf.scoring import load_scorer

                self._scorer = load_scorer(self.path, manifest=self.manifest, device=self.device,
                                           precision=self.precision)
        return self._scorer

    def predict(self, synopsis: Sequence[Any], genres: Sequence[Any], studio: Sequence[Any],
                episodes: Sequence[Any]) -> np.ndarray:
        return self.scorer().predict(synopsis, genres, studio, episodes)

    def explain(self, synopsis: Sequence[Any], genres: Sequence[Any], studio: Sequence[Any],
                episodes: Sequence[Any]) -> dict[str, np.ndarray]:
        return self.scorer().explain(synopsis, genres, studio, episodes)

    def predict_interval(self, synopsis: Sequence[Any], genres: Sequence[Any], studio: Sequence[Any],
                         episodes: Sequence[Any], level: Sequence[Any]) -> dict[str, np.ndarray]:
        return self.scorer().predict_interval(synopsis, genres, studio, episodes, level)

    def calibration(self) -> Calibration:
        return self.scorer().calibration()


def arrow_udf(scorer: Scorer | LazyScorer, explain: bool = False):
    """A DuckDB Arrow UDF (synopsis, genres, studio, episodes) -> DOUBLE for ``scorer``, or with
    ``explain`` -> the STRUCT of its score's parts."""

    def predict(synopsis, genres, studio, episodes) -> pa.Array:
        # DuckDB flattens a constant argument beside varying ones; when all four are
        # constant it calls once with one row and repeats the result for every row.
        return score_batch(scorer, [c.to_pylist() for c in (synopsis, genres, studio, episodes)], explain)

    return predict


def interval_udf(scorer: Scorer | LazyScorer):
    """A DuckDB Arrow UDF (synopsis, genres, studio, episodes, level) -> STRUCT(lo, hi) for ``scorer``."""

    def interval(synopsis, genres, studio, episodes, level) -> pa.Array:
        return interval_batch(scorer, [c.to_pylist() for c in (synopsis, genres, studio, episodes, level)])

    return interval


@dataclass
class ScoredCatalog:
    """What ``score`` did with a catalog, on every engine: its columns named as a scoring function
    (SQL names ignore case) are an earlier run's scores; those of a function this run scores are
    ``replaced`` (never a stale score beside a renamed new one), the others are the user's and
    ``kept`` as they are, and said."""

    functions: list[str]
    replaced: list[str]
    kept: list[str]
    rows: int = 0

    @classmethod
    def of(cls, columns: Sequence[str], functions: Sequence[str]) -> ScoredCatalog:
        scored = {name.lower() for name in functions}
        others = {name.lower() for name in FUNCTION_NAMES.values()} - scored
        return cls(list(functions), [c for c in columns if c.lower() in scored],
                   [c for c in columns if c.lower() in others])

    def summary(self, out: Path | str, engine: str = "") -> str:
        """The line ``score`` prints."""
        def columns(names: list[str]) -> str:
            return f"{', '.join(names)} column{'s' if len(names) > 1 else ''}"

        line = f"scored {self.rows} rows with {', '.join(self.functions)}{engine} -> {out}"
        if self.replaced:
            line += f"; replaced the input's {columns(self.replaced)}"
        if self.kept:
            line += f"; kept the input's {columns(self.kept)} as it was (not scored by this run)"
        return line


def score_file(con: duckdb.DuckDBPyConnection, functions: Sequence[str], data: Path | Any, out: Path
               ) -> ScoredCatalog:
    """``anime-udf score`` on DuckDB: the catalog ``data`` as read (``read_catalog_as_read``: the
    user's columns value for value and type for type) plus one column per scoring function of
    ``functions`` registered on ``con``, streamed to ``out`` (.csv or .parquet), atomically."""
    from anime_udf.catalog import read_catalog_as_read
    from anime_udf.columns import INPUT_COLUMNS
    from anime_udf.files import atomic_file
    from anime_udf.sqlutil import quote_ident, quote_literal

    catalog, inputs = read_catalog_as_read(data)
    con.register("catalog", catalog)
    con.register("model_inputs", inputs)  # what the functions are given, row for row beside the catalog
    result = ScoredCatalog.of(catalog.columns, functions)
    result.rows = catalog.height
    kept = f"c.* EXCLUDE ({', '.join(map(quote_ident, result.replaced))})" if result.replaced else "c.*"
    arguments = ", ".join(f"i.{quote_ident(c)}" for c in INPUT_COLUMNS)
    calls = ", ".join(f"{fn}({arguments}) AS {quote_ident(fn)}" for fn in functions)
    file_format = "csv" if out.suffix.lower() == ".csv" else "parquet"
    with atomic_file(out) as tmp:  # DuckDB streams the scored rows to the file: memory stays flat
        con.execute(f"COPY (SELECT {kept}, {calls} FROM catalog c POSITIONAL JOIN model_inputs i) "
                    f"TO {quote_literal(tmp)} (FORMAT {file_format})")
    return result


def score_catalog(data: Path | DatabaseTable, out: Path, *, model_paths: Sequence[str] = (),
                  models_dir: Path | str | None = None, device: str = "auto", precision: str = "auto"
                  ) -> ScoredCatalog:
    """``anime-udf score`` on DuckDB (Spark's is ``spark.score_catalog``): ``out`` checked before any
    scoring, then the catalog scored by the bundles ``model_paths`` names (``chosen_bundles``)."""
    check_score_out(out, data)
    con, scorers = connect(models_dir, model_paths, device, precision)
    return score_file(con, list(scorers), data, out)


def check_score_out(out: Path, data: Path | DatabaseTable) -> None:
    """score's --out, checked before any scoring: a .parquet or .csv file, not a directory and not
    the --data file itself (through a link or not)."""
    from anime_udf.files import check_out_suffix

    if out.is_dir():
        raise OptionError(f"{out}: a directory; name a .parquet or .csv file", "--out")
    if isinstance(data, Path) and out.exists() and out.samefile(data):
        raise OptionError(f"{out} is the --data file {data}; write the scores to another file", "--out")
    check_out_suffix(out)


def score_batch(scorer: Scorer | LazyScorer, columns: list[list], explain: bool) -> pa.Array:
    """The body of every engine's UDF: one batch's four argument columns in, its scores (DOUBLE)
    or, with ``explain``, the STRUCT of their parts out."""
    if explain:
        return arrow_struct(scorer.explain(*columns))
    return pa.array(scorer.predict(*columns), type=pa.float64())


def interval_batch(scorer: Scorer | LazyScorer, columns: list[list]) -> pa.StructArray:
    """The body of every engine's interval UDF: the four inputs and the level in, STRUCT(lo, hi) out."""
    return arrow_struct(scorer.predict_interval(*columns))


def replace_function(con: duckdb.DuckDBPyConnection, name: str, function: Callable, arguments: list,
                     returns: Any) -> str:
    try:
        con.remove_function(name)
    except duckdb.Error:
        pass  # nothing registered under that name yet
    con.create_function(
        name,
        function,
        arguments,
        returns,
        type="arrow",
        null_handling="special",  # NULL inputs are missing values, scored per the NULL policy
        side_effects=False,
    )
    return name


def register_scorer(con: duckdb.DuckDBPyConnection, scorer: Scorer | LazyScorer, name: str | None = None,
                    explain: bool = False) -> str:
    """Register ``scorer``'s scoring function (or with ``explain``, its explaining function)."""
    name = name or (EXPLAIN_NAMES if explain else FUNCTION_NAMES)[scorer.kind]
    returns = duckdb.struct_type({field: DOUBLE for field in fields(scorer.kind)}) if explain else DOUBLE
    return replace_function(con, name, arrow_udf(scorer, explain), [VARCHAR, VARCHAR, VARCHAR, DOUBLE], returns)


def register_interval(con: duckdb.DuckDBPyConnection, scorer: Scorer | LazyScorer, name: str | None = None) -> str:
    """Register ``scorer``'s interval function, ``INTERVAL_NAMES[kind]`` unless ``name``."""
    return replace_function(con, name or INTERVAL_NAMES[scorer.kind], interval_udf(scorer),
                            [VARCHAR, VARCHAR, VARCHAR, DOUBLE, DOUBLE],
                            duckdb.struct_type({field: DOUBLE for field in INTERVAL_FIELDS}))


def register_functions(con: duckdb.DuckDBPyConnection, scorer: Scorer | LazyScorer) -> None:
    """A bundle's three functions: its score, its score's parts and its interval."""
    register_scorer(con, scorer)
    register_scorer(con, scorer, explain=True)
    register_interval(con, scorer)


def register(
    con: duckdb.DuckDBPyConnection,
    baseline: Path | str | None = None,
    fusion: Path | str | None = None,
    models_dir: Path | str | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> dict[str, LazyScorer]:
    """Register ``predict_score`` (baseline) and ``predict_score_fusion`` on ``con``, each with its
    ``explain_score`` / ``explain_score_fusion`` (the score's parts, anime_udf.explain) and its
    ``predict_score_interval`` / ``predict_score_fusion_interval`` (a prediction interval,
    anime_udf.intervals).

    Without explicit bundle paths, each kind's bundle in the models directory (``models_dir``,
    ``$ANIME_UDF_MODELS`` or ``./models``) is used: its production alias (``anime-udf promote``),
    else its newest bundle. They are resolved now: a connection keeps the bundles it registered
    until ``register`` is called on it again, which replaces its functions. ``device``
    runs the text encoder: ``auto`` (a CUDA GPU when present, else the CPU), ``cpu``
    or ``cuda``. ``precision`` is the text encoder's: ``auto`` (bf16 on CUDA and on CPUs
    with native bf16, else fp32), ``fp32`` or ``bf16``. Bundles are checked now and
    loaded on their function's first call. Returns {scoring function name: scorer}.
    """
    def register_both(path: Path, manifest: dict[str, Any]) -> LazyScorer:
        scorer = LazyScorer(path, device, precision, manifest)  # one load serves its three functions
        register_functions(con, scorer)
        return scorer

    return register_bundles(baseline, fusion, models_dir, register_both)


def register_bundles(baseline: Path | str | None, fusion: Path | str | None, models_dir: Path | str | None,
                     register_both: Callable[[Path, dict[str, Any]], T]) -> dict[str, T]:
    """The registration loop of every engine (DuckDB's ``register``, Spark's): each bundle to
    register, its files checked once (``read_manifest``), handed with its manifest to the engine's
    ``register_both``, which registers its functions (score, parts, interval). Returns {scoring
    function name: what ``register_both`` returned}."""
    registered = {}
    for path in bundles_to_register(baseline, fusion, models_dir):
        manifest = read_manifest(path)
        registered[FUNCTION_NAMES[manifest["kind"]]] = register_both(Path(path), manifest)
    return registered


def bundles_to_register(baseline: Path | str | None, fusion: Path | str | None,
                        models_dir: Path | str | None) -> list[Path | str]:
    """The bundles a ``register`` (DuckDB's or Spark's) registers: those given, or without
    any, each kind's (``registry.resolve_each_kind``); none at all is an error."""
    if baseline is not None or fusion is not None:
        return [path for path in (baseline, fusion) if path is not None]
    paths = resolve_each_kind(models_dir)
    if not paths:
        raise NoModelsError(no_bundle_message(models_dir))
    return paths


def connect(models_dir: Path | str | None, model_paths: Sequence[str] = (), device: str = "auto",
            precision: str = "auto", *, require_models: bool = True, database: Path | None = None,
            read_only: bool = True) -> tuple[duckdb.DuckDBPyConnection, dict[str, LazyScorer]]:
    """An in-process DuckDB (on ``database``, a DuckDB file, where given) with the scoring
    functions registered (none, where there is no bundle and ``require_models`` is false)."""
    from anime_udf.catalog import duckdb_path

    con = duckdb.connect(duckdb_path(database), read_only=read_only) if database else duckdb.connect()
    try:
        scorers = register(con, models_dir=models_dir, device=device, precision=precision,
                           **chosen_bundles(model_paths, models_dir))
    except NoModelsError:
        if require_models:
            raise
        scorers = {}
    return con, scorers


def chosen_bundles(model_paths: Sequence[str], models_dir: Path | str | None) -> dict[str, Path]:
    """``--model`` names or paths as {kind: bundle}; none: register's default, each kind's
    production bundle, else its newest. Each SQL function serves one bundle: two of a kind are refused."""
    chosen: dict[str, Path] = {}
    for name in model_paths:
        path = get_model(name, models_dir)
        kind = read_manifest(path, verify=False)["kind"]
        if kind in chosen and chosen[kind].resolve() != path.resolve():
            raise OptionError(f"two {kind} bundles ({chosen[kind]} and {path}): {FUNCTION_NAMES[kind]} "
                              "serves one; compare two with `anime-udf compare`", "--model")
        chosen[kind] = path
    return chosen
