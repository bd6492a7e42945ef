"""The Spark engine against DuckDB on the same rows, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/spark_benchmark.py \
        --data all.parquet --baseline models/baseline-X --fusion models/fusion-X [--master local[2]]

``--data`` is a Parquet catalog with an ``anime_id`` key (e.g. ../shared/data/anime_catalog.csv
written as Parquet). Every step runs in this process, on a store and an embedding cache in a
fresh temporary directory, so the first rescoring is truly cold:

1. start-up     the SparkSession and a first one-row job (JVM, Python workers);
2. cold         anime_udf.rescore.on_spark on an empty store with an empty cache: every synopsis
                is encoded, both models score every row;
3. warm         the same catalog again: nothing to score;
4. 1% changed   1% of the synopses edited;
5. scoring      SELECT sum(predict_score(...)), sum(predict_score_fusion(...)) over the catalog,
                on Spark (workers already loaded) and on DuckDB (anime_udf.register), warm cache.

Prints one JSON object. Nothing is written outside the temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def worker_rss_mb() -> float:
    """The largest resident set of a PySpark Python worker now running, in MB."""
    largest = 0
    for proc in Path("/proc").iterdir():
        try:
            if b"pyspark" in (proc / "cmdline").read_bytes():
                rss = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("VmRSS"))
                largest = max(largest, int(rss.split()[1]))
        except (OSError, StopIteration, ValueError):
            continue
    return round(largest / 1024, 1)


def time_twice(figures: dict, engine: str, run_query) -> None:
    """The query's seconds and rows/s, first run (workers or models loading) and second."""
    for run in ("first", "second"):
        clock = time.perf_counter()
        run_query()
        seconds = time.perf_counter() - clock
        figures[f"{engine}_scoring_{run}_s"] = round(seconds, 2)
        figures[f"{engine}_rows_per_s_{run}"] = round(figures["rows"] / seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--baseline", required=True, type=Path)
    parser.add_argument("--fusion", required=True, type=Path)
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spark-benchmark-"))
    os.environ["ANIME_UDF_CACHE"] = str(work / "cache")  # the workers inherit it in local mode

    import duckdb
    import polars as pl

    import anime_udf
    from anime_udf import spark as spark_udf
    from anime_udf.catalog import read_catalog
    from anime_udf.rescore.on_spark import rescore_spark

    figures: dict = {"master": args.master, "rows": pl.scan_parquet(args.data).select(pl.len()).collect().item()}
    clock = time.perf_counter()
    spark = spark_udf.session(args.master)
    spark.range(1).collect()
    figures["startup_s"] = round(time.perf_counter() - clock, 1)

    models = [str(args.baseline), str(args.fusion)]
    store = work / "store"
    for step in ("cold", "warm"):
        report = rescore_spark(spark, str(args.data), store, models=models)
        figures[f"rescore_{step}_s"] = report.seconds
        figures[f"rescore_{step}_scored"] = sum(m["rows_scored"] for m in report.models)
    changed = read_catalog(args.data).with_columns(
        synopsis=pl.when(pl.col("anime_id").hash(7) % 100 == 0)
        .then(pl.col("synopsis") + " Edited tonight.").otherwise(pl.col("synopsis")))
    changed.write_parquet(work / "changed.parquet")
    report = rescore_spark(spark, str(work / "changed.parquet"), store, models=models)
    figures["rescore_1pct_s"] = report.seconds
    figures["rescore_1pct_scored"] = sum(m["rows_scored"] for m in report.models)

    query = ("SELECT sum(predict_score(synopsis, genres, studio, episodes)) AS b, "
             "sum(predict_score_fusion(synopsis, genres, studio, episodes)) AS f FROM anime")
    spark_udf.register(spark, baseline=args.baseline, fusion=args.fusion)
    spark_udf.read_catalog_parquet(spark, str(args.data)).createOrReplaceTempView("anime")
    time_twice(figures, "spark", lambda: spark.sql(query).collect())
    figures["spark_worker_rss_mb"] = worker_rss_mb()

    con = duckdb.connect()
    anime_udf.register(con, baseline=args.baseline, fusion=args.fusion)
    con.register("anime", read_catalog(args.data))
    time_twice(figures, "duckdb", lambda: con.sql(query).fetchall())
    spark.stop()
    shutil.rmtree(work)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
