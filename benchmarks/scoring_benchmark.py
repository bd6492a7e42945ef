"""SQL scoring throughput of predict_score / predict_score_fusion, in rows per second.

    .venv/bin/python benchmarks/scoring_benchmark.py --data ../shared/data/anime_catalog.csv \
        --where "anime_id % 5 = 0" --baseline models/baseline-X --fusion models/fusion-Y

Each model is measured in one run with an empty embedding cache (every synopsis
encoded), then with it warm (the nightly-rescore case); a frozen-encoder fusion model
is also scored from the cache the baseline filled (they share it). Last, the cost of
the seed ensemble: warm scoring with all heads against one head.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import duckdb
import torch

from anime_udf.catalog import read_catalog
from anime_udf.metrics import metrics_table
from anime_udf.udf import FUNCTION_NAMES, register

INPUTS = ("synopsis", "genres", "studio", "episodes")


@contextmanager
def empty_cache():
    previous = os.environ.get("ANIME_UDF_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["ANIME_UDF_CACHE"] = cache
        try:
            yield
        finally:
            if previous is None:
                del os.environ["ANIME_UDF_CACHE"]
            else:
                os.environ["ANIME_UDF_CACHE"] = previous


def timed_scoring(bundle: Path, kind: str, data: Path, where: str | None) -> tuple[int, float, dict]:
    con = duckdb.connect()
    register(con, **{kind: bundle})
    con.register("catalog", read_catalog(data, require_score=True))
    filter_sql = f"WHERE {where}" if where else ""
    start = time.perf_counter()
    con.execute(f"CREATE TEMP TABLE predictions AS SELECT '{kind}' AS model, score AS y, "
                f"{FUNCTION_NAMES[kind]}(synopsis, genres, studio, episodes) AS yhat FROM catalog {filter_sql}")
    seconds = time.perf_counter() - start
    metrics = metrics_table(con, "predictions").row(0, named=True)
    return metrics["n"], seconds, metrics


def report(label: str, n: int, seconds: float, metrics: dict) -> None:
    print(f"{label:36} {n:6d} rows {seconds:8.2f} s {n / seconds:9.1f} rows/s   "
          f"MAE {metrics['mae']:.4f}  RMSE {metrics['rmse']:.4f}  Spearman {metrics['spearman']:.4f}")


def ensemble_cost(bundle: Path, kind: str, data: Path, where: str | None) -> None:
    """Warm scoring with the whole seed ensemble against its first member alone."""
    con = duckdb.connect()
    (registered,) = register(con, **{kind: bundle}).values()
    scorer = registered.scorer()  # the loaded model, whose heads are swapped below
    con.register("catalog", read_catalog(data))
    df = con.sql(f"SELECT * FROM catalog {('WHERE ' + where) if where else ''}").pl()
    columns = [df[c].to_list() for c in INPUTS]
    scorer.predict(*columns)  # warm the cache
    members = scorer.net.members
    timings = {}
    for label, chosen in ((f"{len(members)} heads", members), ("1 head", members[:1])):
        scorer.net.members = torch.nn.ModuleList(chosen)
        start = time.perf_counter()
        scorer.predict(*columns)
        timings[label] = time.perf_counter() - start
    scorer.net.members = members
    print(f"{kind} warm, " + ", ".join(f"{k}: {df.height / s:9.1f} rows/s" for k, s in timings.items()))


def bundle_arguments(description: str) -> tuple[argparse.Namespace, dict[str, Path]]:
    """The options of a benchmark over a catalog's rows and one or both bundles (also explain_benchmark's):
    the arguments and {kind: bundle}."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--where", help="SQL filter on the catalog")
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--fusion", type=Path)
    args = parser.parse_args()
    return args, {kind: path for kind, path in (("baseline", args.baseline), ("fusion", args.fusion)) if path}


def main() -> None:
    args, bundles = bundle_arguments(__doc__.splitlines()[0])
    for kind, bundle in bundles.items():
        with empty_cache():  # starts empty; the first run fills it
            report(f"{kind}, cold cache", *timed_scoring(bundle, kind, args.data, args.where))
            report(f"{kind}, warm cache", *timed_scoring(bundle, kind, args.data, args.where))
    if len(bundles) == 2:
        with empty_cache():
            timed_scoring(bundles["baseline"], "baseline", args.data, args.where)
            report("fusion, cache filled by the baseline", *timed_scoring(bundles["fusion"], "fusion", args.data,
                                                                          args.where))
    for kind, bundle in bundles.items():
        ensemble_cost(bundle, kind, args.data, args.where)


if __name__ == "__main__":
    main()
