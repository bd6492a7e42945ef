"""How the prediction intervals do on rows the models never trained on (docs/intervals.md):
coverage, mean width and interval score at each level, against the constant width calibrated
on the same rows, the coverage in each fifth of the predicted score, and what an interval costs
against its point score (warm embedding cache), all through DuckDB SQL.

    .venv/bin/python benchmarks/interval_benchmark.py --data valid.parquet \
        --baseline models/baseline-X --fusion models/fusion-Y [--where "year >= 2017"]

Targets (issue 33): coverage within 2.5 points of 0.8 and 0.9, within 6 points in each fifth of
the predicted score, an interval score at 0.9 at least 5 % below the constant width's, and an
interval costing at most 10 % more than its score.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import duckdb

from anime_udf.catalog import read_catalog
from anime_udf.evaluation import CONSTANT_WIDTH
from anime_udf.metrics import load_metric_macros
from anime_udf.udf import FUNCTION_NAMES, INTERVAL_NAMES, register

LEVELS = (0.5, 0.8, 0.9, 0.95)
ARGS = "synopsis, genres, studio, episodes"


def interval_rows(con: duckdb.DuckDBPyConnection, scorer, level: float) -> None:
    """The table ``intervals`` (model, fifth, y, lo, hi): the model's and its constant width's."""
    kind, half = scorer.kind, scorer.calibration().constant_half_width(level)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE intervals AS
        WITH scored AS (
            SELECT score AS y, {FUNCTION_NAMES[kind]}({ARGS}) AS yhat, {INTERVAL_NAMES[kind]}({ARGS}, {level}) AS i
            FROM selected)
        SELECT '{kind}' AS model, ntile(5) OVER (ORDER BY yhat) AS fifth, y, i.lo AS lo, i.hi AS hi FROM scored
        UNION ALL
        SELECT '{kind} {CONSTANT_WIDTH}', ntile(5) OVER (ORDER BY yhat), y,
               greatest(1.0, yhat - {half!r}), least(10.0, yhat + {half!r}) FROM scored""")


def seconds(con: duckdb.DuckDBPyConnection, *expressions: str, runs: int = 31) -> list[float]:
    """The best of ``runs`` runs of each expression over the selected rows (the embeddings cached),
    the expressions taking turns so that a busy spell on a shared machine hits them alike."""
    best = [float("inf")] * len(expressions)
    for _ in range(runs):
        for i, expression in enumerate(expressions):
            start = time.perf_counter()
            con.execute(f"SELECT count({expression}) FROM selected").fetchall()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--where", help="SQL predicate choosing the evaluated rows")
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--fusion", type=Path)
    args = parser.parse_args()
    con = duckdb.connect()
    scorers = register(con, baseline=args.baseline, fusion=args.fusion, device="cpu", precision="fp32")
    load_metric_macros(con)
    con.register("catalog", read_catalog(args.data))
    con.execute(f"CREATE TEMP TABLE selected AS SELECT * FROM catalog WHERE score IS NOT NULL "
                f"AND ({args.where or 'true'})")
    n = con.execute("SELECT count(*) FROM selected").fetchone()[0]
    print(f"{n} rows")
    print("| model | level | coverage | mean width | interval score | coverage by fifth of the score (low → high) |")
    print("|---|---|---|---|---|---|")
    for scorer in scorers.values():
        for level in LEVELS:
            interval_rows(con, scorer, level)
            rows = con.execute(f"""
                SELECT model, interval_coverage(y, lo, hi), interval_width(lo, hi), interval_score(y, lo, hi, {level}),
                       (SELECT string_agg(printf('%.1f', 100 * c), ' · ' ORDER BY fifth) FROM (
                            SELECT fifth, interval_coverage(y, lo, hi) AS c FROM intervals i
                            WHERE i.model = o.model GROUP BY fifth))
                FROM intervals o GROUP BY model ORDER BY model""").fetchall()
            for model, coverage, width, score, fifths in rows:
                print(f"| {model} | {level} | {100 * coverage:.1f} % | {width:.3f} | {score:.3f} | {fifths} |")
    con.execute("SET threads TO 1")  # the cost of the work, not of how a shared machine's cores are handed out
    for scorer in scorers.values():
        kind = scorer.kind
        point, interval = seconds(con, f"{FUNCTION_NAMES[kind]}({ARGS})", f"{INTERVAL_NAMES[kind]}({ARGS}, 0.9)")
        print(f"{kind}: score {n / point:,.0f} rows/s, interval {n / interval:,.0f} rows/s "
              f"({interval / point - 1:+.1%}; embeddings cached, one thread)")


if __name__ == "__main__":
    main()
