"""SQL scoring throughput of predict_score / predict_score_fusion, in rows per second.

    .venv/bin/python benchmarks/scoring_benchmark.py --data ../shared/data/anime_catalog.csv \
        --where "anime_id % 5 = 0" --baseline models/baseline-X --fusion models/fusion-Y

The baseline is measured twice in one run: with an empty embedding cache (every
synopsis encoded) and with the cache warm (the nightly-rescore case).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import duckdb

from anime_udf.catalog import read_catalog
from anime_udf.metrics import metrics_table
from anime_udf.udf import register


def timed_scoring(bundle: Path, kind: str, data: Path, where: str | None) -> tuple[int, float, dict]:
    con = duckdb.connect()
    register(con, **{kind: bundle})
    con.register("catalog", read_catalog(data, require_score=True))
    fn = "predict_score" if kind == "baseline" else "predict_score_fusion"
    filter_sql = f"WHERE {where}" if where else ""
    start = time.perf_counter()
    con.execute(f"CREATE TEMP TABLE predictions AS SELECT '{kind}' AS model, score AS y, "
                f"{fn}(synopsis, genres, studio, episodes) AS yhat FROM catalog {filter_sql}")
    seconds = time.perf_counter() - start
    metrics = metrics_table(con, "predictions").row(0, named=True)
    return metrics["n"], seconds, metrics


def report(label: str, n: int, seconds: float, metrics: dict) -> None:
    print(f"{label:28} {n:6d} rows {seconds:8.1f} s {n / seconds:9.1f} rows/s   "
          f"MAE {metrics['mae']:.4f}  RMSE {metrics['rmse']:.4f}  Spearman {metrics['spearman']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--where", help="SQL filter on the catalog")
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--fusion", type=Path)
    args = parser.parse_args()
    if args.baseline:
        previous = os.environ.get("ANIME_UDF_CACHE")
        with tempfile.TemporaryDirectory() as cache:
            os.environ["ANIME_UDF_CACHE"] = cache  # starts empty; the first run fills it
            report("baseline, cold cache", *timed_scoring(args.baseline, "baseline", args.data, args.where))
            report("baseline, warm cache", *timed_scoring(args.baseline, "baseline", args.data, args.where))
        if previous is None:
            del os.environ["ANIME_UDF_CACHE"]
        else:
            os.environ["ANIME_UDF_CACHE"] = previous
    if args.fusion:
        report("fusion", *timed_scoring(args.fusion, "fusion", args.data, args.where))


if __name__ == "__main__":
    main()
