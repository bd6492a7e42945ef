"""The SQL functions on Apache Spark: the same scorer, in Spark's Arrow UDFs.

``register(spark, models_dir=DIR)`` registers ``predict_score`` and ``predict_score_fusion``
as Spark SQL functions (and returns them as column functions for the DataFrame API).
Each is an iterator-form Arrow UDF (``pyspark.sql.functions.arrow_udf``, Spark >= 4.1):
a Python worker loads a bundle once, with ``anime_udf.scoring.load_scorer`` as the
DuckDB functions do, and scores whole Arrow batches with ``Scorer.predict``. One
scoring code path, two engines; the NULL policy, the [1, 10] range, batch independence
and per-row constant arguments are the scorer's, so they hold on both.

Workers must run a Python that has anime-udf installed: ``session()`` sets
``PYSPARK_PYTHON`` to this interpreter where it is unset.
On a cluster, see docs/spark.md, "Running on a cluster".

This module imports pyspark (the ``spark`` extra); ``import anime_udf`` never does.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import sys
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc
from py4j.protocol import Py4JJavaError
from pyspark.errors import PySparkException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.udf import UserDefinedFunction

from anime_udf.catalog import CatalogError, read_catalog
from anime_udf.columns import EPISODES, GENRES, INPUT_COLUMNS, STUDIO, SYNOPSIS
from anime_udf.errors import AnimeUdfError
from anime_udf.explain import arrow_struct, fields
from anime_udf.udf import (EXPLAIN_NAMES, FUNCTION_NAMES, INTERVAL_FIELDS, INTERVAL_NAMES, ScoredCatalog,
                           chosen_bundles, interval_batch, register_bundles, score_batch)

ARGUMENTS = "(synopsis STRING, genres STRING, studio STRING, episodes DOUBLE)"
INTERVAL_ARGUMENTS = "(synopsis STRING, genres STRING, studio STRING, episodes DOUBLE, level DOUBLE)"
# What each argument may be, as Arrow types: Spark passes a NULL literal as type null.
TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view, pa.types.is_null)
NUMBER_TYPES = (pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal, pa.types.is_null)
# The input columns as read_catalog makes them (episodes an integer), for the rescoring's hash
# on the workers; not the SQL functions' argument types (ARGUMENTS: episodes DOUBLE).
CANONICAL_TYPES = {SYNOPSIS: pa.string(), GENRES: pa.string(), STUDIO: pa.string(), EPISODES: pa.int64()}
# Spark's names of the Arrow types the UDFs return in a struct.
SPARK_TYPES = {pa.string(): "string", pa.int64(): "bigint", pa.bool_(): "boolean", pa.float64(): "double"}


# What a failed Spark job raises in the driver (most failures are converted to the first).
SPARK_ERRORS = (PySparkException, Py4JJavaError)
# What score_with_interval_udf returns: a score and its interval.
SCORE_WITH_INTERVAL = ("score", *INTERVAL_FIELDS)


# Local mode runs the executors in the driver's JVM, whose heap Spark sizes at 1 GB: a rescoring of
# a million rows ran out of it (the JVM exits, and the driver only sees its connection refused).
LOCAL_DRIVER_MEMORY = "4g"


class SparkJobError(AnimeUdfError, RuntimeError):
    """A Spark job failed; the message is the worker's own error where there is one."""


def session(master: str | None = None, *, app_name: str = "anime-udf", progress: bool = False,
            conf: dict[str, str] | None = None) -> SparkSession:
    """The active SparkSession, or a new one whose Python workers run this interpreter
    (unless ``PYSPARK_PYTHON`` names another), where anime-udf is installed. ``progress``
    shows Spark's console progress bar on stderr; ``conf``: more Spark settings, e.g.
    ``{"spark.executorEnv.ANIME_UDF_CACHE": "/local/disk/anime-udf"}``. In local mode the
    driver's heap, where the executors run, is ``LOCAL_DRIVER_MEMORY`` unless set."""
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # PySpark reads the workers' interpreter from the environment when the context starts
    # (the spark.pyspark.python setting is spark-submit's only).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    master = master or "local[*]"
    builder = SparkSession.builder.appName(app_name).master(master)
    for name, value in session_settings(master, progress, conf).items():
        builder = builder.config(name, value)
    spark = builder.getOrCreate()
    # Spark's own log lines (a failed task's Java and Python stack traces) are noise to a
    # user of the CLI: errors reach the caller as one SparkJobError.
    spark.sparkContext.setLogLevel("OFF")
    return spark


def session_settings(master: str, progress: bool, conf: dict[str, str] | None) -> dict[str, str]:
    """The settings ``session()`` starts a session with: ``conf``, the progress bar, and in local
    mode ``LOCAL_DRIVER_MEMORY`` unless ``conf`` or ``PYSPARK_SUBMIT_ARGS`` sizes the driver."""
    settings = {"spark.ui.showConsoleProgress": str(progress).lower(), **(conf or {})}
    if (master.startswith("local") and "spark.driver.memory" not in settings
            and "driver-memory" not in os.environ.get("PYSPARK_SUBMIT_ARGS", "")):
        settings["spark.driver.memory"] = LOCAL_DRIVER_MEMORY
    return settings


@contextmanager
def owned_session(master: str | None = None, *, progress: bool = False,
                  conf: dict[str, str] | None = None) -> Iterator[SparkSession]:
    """``session()`` for one command: stopped at the end if this started it."""
    existing = SparkSession.getActiveSession()
    spark = session(master, progress=progress, conf=conf)
    try:
        yield spark
    finally:
        if existing is None:
            spark.stop()


# --- the SQL functions ------------------------------------------------------------------------


@lru_cache(maxsize=None)
def worker_scorer(bundle: str, device: str, precision: str):
    """A bundle's scorer, loaded once per Python worker process (Spark reuses workers
    across tasks, so a bundle is not reloaded for every partition)."""
    from anime_udf.scoring import load_scorer  # torch: on the workers, only when scoring

    return load_scorer(bundle, device=device, precision=precision)


def _bundle_on_worker(bundle: str, shipped: bool) -> str:
    if not shipped:
        return bundle
    from pyspark import SparkFiles

    return SparkFiles.get(shipped_name(bundle))  # the archive, unpacked into a directory of its name


def shipped_name(bundle: Path | str) -> str:
    return f"{Path(bundle).name}.zip"


def arguments(name: str, columns: tuple[pa.Array, ...]) -> list[list]:
    """The argument columns as the scorer takes them (the DuckDB functions' types: text, and
    episodes (and an interval's level) as DOUBLE), or a TypeError naming the function and its
    signature."""
    interval = name in INTERVAL_NAMES.values()
    names = (*INPUT_COLUMNS, "level") if interval else INPUT_COLUMNS
    values = []
    for column, array in zip(names, columns):
        number = column in (EPISODES, "level")
        if not any(check(array.type) for check in (NUMBER_TYPES if number else TEXT_TYPES)):
            returns = "DOUBLE" if name in FUNCTION_NAMES.values() else "STRUCT"
            raise TypeError(f"{name}: argument {column} has type {array.type}, expected "
                            f"{'a number' if number else 'text'}; the signature is "
                            f"{name}{INTERVAL_ARGUMENTS if interval else ARGUMENTS} -> {returns}")
        values.append((pc.cast(array, pa.float64()) if number else array).to_pylist())
    return values


def scoring_udf(name: str, bundle: Path | str, device: str = "auto", precision: str = "auto",
                shipped: bool = False, explain_kind: str | None = None) -> UserDefinedFunction:
    """An iterator Arrow UDF ``name(synopsis, genres, studio, episodes) -> DOUBLE`` scoring with ``bundle``;
    with ``explain_kind`` (the bundle's kind), returning the STRUCT of the score's parts instead."""
    bundle = str(bundle)

    def predict(batches: Iterator[Tuple[pa.Array, pa.Array, pa.Array, pa.Array]]) -> Iterator[pa.Array]:
        scorer = None
        for batch in batches:
            columns = arguments(name, batch)
            if scorer is None:
                scorer = worker_scorer(_bundle_on_worker(bundle, shipped), device, precision)
            yield score_batch(scorer, columns, explain=explain_kind is not None)

    predict.__name__ = name
    returns = spark_struct({f: pa.float64() for f in fields(explain_kind)}) if explain_kind else "double"
    return F.arrow_udf(predict, returns)


def interval_udf(name: str, bundle: Path | str, device: str = "auto", precision: str = "auto",
                 shipped: bool = False) -> UserDefinedFunction:
    """An iterator Arrow UDF ``name(synopsis, genres, studio, episodes, level) -> STRUCT(lo, hi)``:
    the prediction interval of ``bundle``'s score at ``level``."""
    bundle = str(bundle)

    def interval(batches: Iterator[Tuple[pa.Array, pa.Array, pa.Array, pa.Array, pa.Array]]) -> Iterator[pa.Array]:
        for batch in batches:
            columns = arguments(name, batch)
            yield interval_batch(worker_scorer(_bundle_on_worker(bundle, shipped), device, precision), columns)

    interval.__name__ = name
    return F.arrow_udf(interval, spark_struct({f: pa.float64() for f in INTERVAL_FIELDS}))


def score_with_interval_udf(name: str, bundle: Path | str, level: float, device: str = "auto",
                            precision: str = "auto", shipped: bool = False) -> UserDefinedFunction:
    """An iterator Arrow UDF (synopsis, genres, studio, episodes) -> STRUCT(score, lo, hi): ``bundle``'s
    score (that of the function ``name``) and its interval at ``level``, from one pass: what a
    Spark rescore run with a level stores."""
    bundle = str(bundle)

    def predict(batches: Iterator[Tuple[pa.Array, pa.Array, pa.Array, pa.Array]]) -> Iterator[pa.Array]:
        from anime_udf.scoring import Rows

        for batch in batches:
            rows = Rows(*arguments(name, batch))
            scorer = worker_scorer(_bundle_on_worker(bundle, shipped), device, precision)
            scored = scorer.predict_rows_with_interval(rows, [level] * len(rows))
            yield arrow_struct(dict(zip(SCORE_WITH_INTERVAL, scored)))

    predict.__name__ = name
    return F.arrow_udf(predict, spark_struct({f: pa.float64() for f in SCORE_WITH_INTERVAL}))


def ship_bundle(spark: SparkSession, bundle: Path) -> Path:
    """Send ``bundle`` to every executor, once per context, as a zip archive that Spark
    unpacks there (``SparkContext.addArchive``: a cluster master refuses a directory in
    ``addFile``). The UDFs of ``scoring_udf(..., shipped=True)`` load it from
    ``SparkFiles.get(shipped_name(bundle))`` and verify every file's checksum as usual."""
    name = shipped_name(bundle)
    if not any(Path(a).name == name for a in spark.sparkContext.listArchives):
        archive = Path(_ship_dir()) / name
        shutil.make_archive(str(archive.with_suffix("")), "zip", root_dir=bundle)
        spark.sparkContext.addArchive(str(archive))
    return bundle


@lru_cache(maxsize=1)
def _ship_dir() -> str:
    """Where the driver keeps the archives it ships (executors fetch them while jobs run),
    removed when the driver's process exits."""
    path = tempfile.mkdtemp(prefix="anime-udf-ship-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def register(
    spark: SparkSession,
    baseline: Path | str | None = None,
    fusion: Path | str | None = None,
    models_dir: Path | str | None = None,
    device: str = "auto",
    precision: str = "auto",
    ship: bool = False,
) -> dict[str, UserDefinedFunction]:
    """Register ``predict_score`` (baseline) and ``predict_score_fusion`` as Spark SQL
    functions, each with its ``explain_score`` / ``explain_score_fusion`` and its
    ``predict_score_interval`` / ``predict_score_fusion_interval``, like
    ``anime_udf.register`` does on DuckDB: the given bundles, or each kind's production bundle
    (else its newest) in the models directory. Returns {scoring function name: column function} (the explaining
    functions: ``F.call_function("explain_score", ...)``).

    Bundles are checked here, on the driver. The workers read them from the same path
    (a local or shared directory), or, with ``ship=True``, from a copy that ``ship_bundle``
    sends to every executor. ``device`` is where the workers
    run the text encoder (``auto``: a CUDA GPU when the executor has one), ``precision`` how
    (``auto``: bf16 where the executor's hardware has it), as for ``anime_udf.register``."""
    def register_both(path: Path, manifest: dict) -> UserDefinedFunction:
        kind, name = manifest["kind"], FUNCTION_NAMES[manifest["kind"]]
        bundle = ship_bundle(spark, path.resolve()) if ship else path.resolve()
        spark.udf.register(EXPLAIN_NAMES[kind], scoring_udf(EXPLAIN_NAMES[kind], bundle, device, precision, ship, kind))
        spark.udf.register(INTERVAL_NAMES[kind], interval_udf(INTERVAL_NAMES[kind], bundle, device, precision, ship))
        return spark.udf.register(name, scoring_udf(name, bundle, device, precision, ship))

    return register_bundles(baseline, fusion, models_dir, register_both)


# --- catalogs ---------------------------------------------------------------------------------


def canonical_inputs(batches: Iterator[Tuple[pa.Array, pa.Array, pa.Array, pa.Array]], label: str
                     ) -> Iterator[pa.Array]:
    """The four input columns as ``read_catalog`` makes them (the rules of the DuckDB
    commands: genres lists joined, episodes integers, a bad value named), one struct a row."""
    for batch in batches:
        inputs = read_catalog(pa.Table.from_arrays(list(batch), names=list(INPUT_COLUMNS)), name=label)
        yield pa.StructArray.from_arrays([inputs[c].to_arrow().cast(CANONICAL_TYPES[c]) for c in INPUT_COLUMNS],
                                         names=list(INPUT_COLUMNS))


def read_parquet(spark: SparkSession, data: str, key: str | None = None) -> DataFrame:
    """A Parquet file, directory or glob that has the input columns (and the ``key`` column,
    where one is given); a CatalogError names what is missing."""
    try:
        df = spark.read.parquet(spark_path(data))
    except SPARK_ERRORS as exc:
        raise CatalogError(f"{data}: cannot read Parquet: {job_error(exc)}") from exc
    missing = [c for c in ((key,) if key else ()) + INPUT_COLUMNS if c not in df.columns]
    if missing:
        hint = "; pass --key COLUMN" if key in missing else ""
        raise CatalogError(f"{data}: missing column(s) {', '.join(missing)} (it has: {', '.join(df.columns)}){hint}")
    return df


def batch_label(data: str) -> str:
    """How errors from a worker name the catalog: read_catalog's row numbers are the batch's."""
    return f"{data} (row numbers count within one Spark batch)"


def read_catalog_parquet(spark: SparkSession, data: str) -> tuple[DataFrame, Column]:
    """A Parquet file, directory or glob as a DataFrame of the user's columns as they are, spread
    over at least as many partitions as Spark runs tasks at once, and the struct of its input
    columns in canonical types (what the scoring functions are given)."""
    df = read_parquet(spark, data)
    label = batch_label(data)

    def canonical(batches: Iterator[Tuple[pa.Array, pa.Array, pa.Array, pa.Array]]) -> Iterator[pa.Array]:
        return canonical_inputs(batches, label)

    inputs = F.arrow_udf(canonical, spark_struct(CANONICAL_TYPES))(*(df[c] for c in INPUT_COLUMNS))
    parallelism = spark.sparkContext.defaultParallelism
    return (df.repartition(parallelism) if df.rdd.getNumPartitions() < parallelism else df), inputs


def spark_struct(fields: dict[str, pa.DataType]) -> str:
    """The Spark type of a struct of these Arrow-typed fields, e.g. ``struct<synopsis string, ...>``."""
    return "struct<" + ", ".join(f"{name} {SPARK_TYPES[t]}" for name, t in fields.items()) + ">"


def job_error(exc: Exception) -> str:
    """The message a user needs from a failed Spark job: the Python worker's own
    ``SomeError: message`` line where there is one, else the root Java cause."""
    text = str(exc)
    worker = re.findall(r"^(\w+(?:Error|Exception): .+)$", text, flags=re.M)
    if worker:
        return worker[-1]
    java = re.findall(r"^(?:Caused by: )?[\w.$]+(?:Error|Exception): (.+)$", text, flags=re.M)
    return java[-1] if java else (text.strip().splitlines() or [type(exc).__name__])[0]


def write_parquet(df: DataFrame, out: Path) -> None:
    """Write ``df`` as a Parquet directory ``out``: into a hidden sibling first, then
    renamed into place, so a failed job leaves ``out`` as it was. An existing ``out``
    is replaced only if it is a Spark output (it has ``_SUCCESS``)."""
    out = Path(out).absolute()  # Spark resolves relative paths against its own start directory
    if out.exists() and not (out / "_SUCCESS").is_file():
        raise AnimeUdfError(f"{out}: exists and is not a Parquet directory written by Spark; "
                            "choose another --out or remove it")
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    try:
        df.write.parquet(str(tmp))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except SPARK_ERRORS as exc:
        raise SparkJobError(job_error(exc)) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def spark_path(path: str | Path) -> str:
    """A path for Spark: a URI (``hdfs://``, ``s3a://``...) as it is, a local path or glob
    made absolute (Spark resolves relative paths against its own start directory)."""
    path = str(path)
    return path if re.match(r"[A-Za-z][\w+.-]*://", path) else os.path.abspath(path)


def score_parquet(spark: SparkSession, data: str, out: Path, *, models_dir: Path | str | None = None,
                  device: str = "auto", precision: str = "auto", ship: bool = False,
                  **bundles: Path | str) -> ScoredCatalog:
    """The catalog ``data`` as it is plus one score column per model (named after its function),
    written to the Parquet directory ``out``; the score columns an earlier run left are replaced or
    kept as ``anime-udf score`` does on DuckDB (``udf.ScoredCatalog``). ``bundles``, ``models_dir``
    and ``ship`` choose the models and how executors read them, as in ``register``."""
    functions = register(spark, **bundles, models_dir=models_dir, device=device, precision=precision, ship=ship)
    df, inputs = read_catalog_parquet(spark, data)
    result = ScoredCatalog.of(df.columns, list(functions))
    scored = df.drop(*result.replaced).select(
        "*", *(fn(*(inputs[c] for c in INPUT_COLUMNS)).alias(name) for name, fn in functions.items()))
    write_parquet(scored, out)
    result.rows = spark.read.parquet(spark_path(out)).count()
    return result


def score_catalog(data: Path | str, out: Path, *, model_paths: Sequence[str] = (),
                  models_dir: Path | str | None = None, device: str = "auto", precision: str = "auto",
                  master: str | None = None, conf: dict[str, str] | None = None, ship: bool = False
                  ) -> ScoredCatalog:
    """``anime-udf score --engine spark`` (DuckDB's is ``udf.score_catalog``): ``score_parquet`` in a
    session of its own (``owned_session``: ``master``, ``conf``), with the bundles ``model_paths``
    names (``udf.chosen_bundles``)."""
    with owned_session(master, progress=True, conf=conf) as spark:
        return score_parquet(spark, str(data), out, models_dir=models_dir, device=device, precision=precision,
                             ship=ship, **chosen_bundles(model_paths, models_dir))
