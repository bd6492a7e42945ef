"""What explaining costs: explain_score / explain_score_fusion against predict_score /
predict_score_fusion, in rows per second through DuckDB SQL.

    .venv/bin/python benchmarks/explain_benchmark.py --data ../shared/data/anime_catalog.csv \
        --where "year >= 2017" --baseline models/baseline-X --fusion models/fusion-Y

Each function runs once with an empty embedding cache (every synopsis encoded: the
encoder's cost, the same for both) and once with it warm (the nightly case, where the
16 or 32 coalitions of the head are most of the work). The goal: warm, explaining costs
at most 3x scoring; cold, at most 1.2x. Last, the mean |part| of each group over the rows.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import duckdb

from anime_udf.catalog import read_catalog
from anime_udf.explain import GROUPS
from anime_udf.udf import EXPLAIN_NAMES, FUNCTION_NAMES, register
from scoring_benchmark import bundle_arguments  # a sibling script: benchmarks/ is on sys.path


def timed(bundle: Path, kind: str, data: Path, where: str | None, function: str,
          cache: str) -> tuple[int, float, duckdb.DuckDBPyConnection]:
    """Rows and seconds of ``function`` over the selected rows, in a fresh connection whose model
    uses the embedding cache ``cache`` (the bundle is loaded before the clock starts)."""
    os.environ["ANIME_UDF_CACHE"] = cache
    con = duckdb.connect()
    register(con, **{kind: bundle})
    con.register("catalog", read_catalog(data))
    con.execute(f"SELECT {FUNCTION_NAMES[kind]}('', NULL, NULL, NULL)").fetchall()
    filter_sql = f"WHERE {where}" if where else ""
    start = time.perf_counter()
    con.execute(f"CREATE TEMP TABLE result AS SELECT {function}(synopsis, genres, studio, episodes) AS r "
                f"FROM catalog {filter_sql}")
    seconds = time.perf_counter() - start
    return con.execute("SELECT count(*) FROM result").fetchone()[0], seconds, con


def main() -> None:
    args, bundles = bundle_arguments(__doc__.splitlines()[0])
    for kind, bundle in bundles.items():
        functions = (FUNCTION_NAMES[kind], EXPLAIN_NAMES[kind])
        with tempfile.TemporaryDirectory() as root:
            caches = {fn: tempfile.mkdtemp(dir=root) for fn in functions}  # each function its own, empty
            rates = {}
            for state in ("cold", "warm"):  # warm: the same cache again, filled by the cold run
                for fn in functions:
                    n, seconds, con = timed(bundle, kind, args.data, args.where, fn, caches[fn])
                    rates[state, fn] = n / seconds
                    print(f"{kind:8} {state} cache  {fn:22} {n:6d} rows {seconds:8.2f} s {n / seconds:9.1f} rows/s")
                ratio = rates[state, functions[0]] / rates[state, functions[1]]
                print(f"{kind:8} {state} cache  explaining costs {ratio:.2f}x scoring")
        means = con.execute("SELECT " + ", ".join(f"avg(abs(r.{g}))" for g in GROUPS[kind]) + " FROM result").fetchone()
        print(f"{kind:8} mean |part|: " + ", ".join(f"{g} {m:.3f}" for g, m in zip(GROUPS[kind], means)))


if __name__ == "__main__":
    main()
