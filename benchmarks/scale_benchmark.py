"""Nightly rescoring of an N-row catalog: cold, unchanged and 1% changed, on DuckDB and Spark.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scale_benchmark.py 1000000 \
        --baseline models/baseline-X --fusion models/fusion-X [--engines duckdb,spark]

The N-row catalog is the real catalog's rows (``--source``, default
../shared/data/anime_catalog.csv) repeated under new keys 0..N-1, so every synopsis is one
the embedding cache has seen and no text is encoded: what is measured is all the work that
is not encoding. A warm-up run rescores ``--source`` itself first (into a throw-away store),
which fills the cache (``$ANIME_UDF_CACHE``, default ~/.cache/anime-udf) where it is not warm.
With ``--empty-cache`` the cache is a new one in ``--work``: the warm-up is then the cold path
(every synopsis of ``--source`` encoded, both models), and its time is printed as such.

Each step is one ``anime-udf rescore`` command in a fresh process (start-up included, as a
scheduler runs it), with both bundles, timed end to end; its peak memory is the largest sum
of the resident sets of the command and every process it started (Spark's JVM and Python
workers included), sampled every 0.2 s:

1. cold        an empty store: every row scored by both models;
2. unchanged   the same catalog again: nothing to score;
3. 1% changed  every hundredth row (key % 100 = 37) takes another real row's synopsis, so its
               input hash changes but its embedding is cached: both models score 1% of the rows.

rows/s is catalog rows / seconds. Nothing is written outside ``--work`` (default: a temporary
directory), apart from the embedding cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "anime_catalog.csv"
CHANGED_EVERY = 100  # 1% of the rows change
CHANGED_AT = 37


def build_catalogs(source: Path, n: int, work: Path) -> tuple[Path, Path]:
    """The N-row catalog and its 1%-changed copy, as Parquet: row i is the source's row i mod
    the source's size, under key i; a changed row takes the next source row's synopsis."""
    from anime_udf.catalog import read_catalog

    src = read_catalog(source).select("synopsis", "genres", "studio", "episodes").with_row_index("rn")
    con = duckdb.connect()
    con.register("src", src)
    size = src.height
    plain, changed = work / f"catalog-{n}.parquet", work / f"catalog-{n}-changed.parquet"
    synopsis = {plain: "s.synopsis",
                changed: f"CASE WHEN i % {CHANGED_EVERY} = {CHANGED_AT} THEN (SELECT synopsis FROM src "
                         f"WHERE rn = (s.rn + 1) % {size}) ELSE s.synopsis END"}
    for path, text in synopsis.items():
        con.execute(f"COPY (SELECT i AS anime_id, {text} AS synopsis, s.genres, s.studio, s.episodes "
                    f"FROM range({n}) r(i) JOIN src s ON s.rn = i % {size} ORDER BY i) "
                    f"TO '{path}' (FORMAT parquet)")
    con.close()
    return plain, changed


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and all its descendants now, in MB."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            status = (proc / "status").read_text().splitlines()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status if ":" in line)
        pid = int(proc.name)
        children.setdefault(int(fields.get("PPid", "0").strip() or 0), []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / 1024


def run_step(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, float, dict]:
    """Run ``command`` in ``cwd``; (seconds, peak MB of its process tree, its JSON report).
    (``python -c`` puts its working directory first on sys.path: ``cwd`` must not hold a
    checkout, so that PYTHONPATH or the installed package decides which anime_udf runs.)"""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-3000:]}\n{out[-2000:]}")
    try:
        return seconds, peak[0], json.loads(out)
    except json.JSONDecodeError:
        raise SystemExit(f"{' '.join(command)} printed no JSON record:\n{out[-3000:]}\n{err[-2000:]}") from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", type=int, help="N, the catalog's rows")
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--fusion", type=Path, required=True)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the catalog whose rows are repeated")
    parser.add_argument("--engines", default="duckdb", help="duckdb, spark or duckdb,spark (default: duckdb)")
    parser.add_argument("--master", default="local[2]", help="Spark master (default: local[2])")
    parser.add_argument("--precision", default="fp32",
                        help="the text encoder's (default fp32: the precision the cache is warm for)")
    parser.add_argument("--no-warm-up", action="store_true", help="skip rescoring --source first")
    parser.add_argument("--empty-cache", action="store_true",
                        help="start from an empty embedding cache in --work: the warm-up times the cold path")
    parser.add_argument("--work", type=Path, help="keep catalogs and stores here (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    cli = [sys.executable, "-c", "from anime_udf.cli import cli; cli()", "rescore", "--json", "--no-progress",
           "--model", str(args.baseline), "--model", str(args.fusion), "--precision", args.precision]
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        env = None
        if args.empty_cache:
            shutil.rmtree(work / "cache", ignore_errors=True)
            env = {**os.environ, "ANIME_UDF_CACHE": str(work / "cache")}
        if not args.no_warm_up:
            seconds, peak, report = run_step([*cli, "--catalog", str(args.source), "--store",
                                              str(work / "warm-up.duckdb")], work, env)
            what = "from an empty embedding cache" if args.empty_cache else "warm-up"
            print(f"{args.source.name}, {report['rows_seen']:,} rows, {what}, {args.precision}: {seconds:.1f} s "
                  f"({report['rows_seen'] / seconds:,.1f} rows/s, peak {peak:,.0f} MB)", flush=True)
            for stale in work.glob("warm-up.duckdb*"):
                stale.unlink()
        clock = time.perf_counter()
        plain, changed = build_catalogs(args.source, args.rows, work)
        print(f"catalogs of {args.rows:,} rows built in {time.perf_counter() - clock:.1f} s; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        results = []
        for engine in args.engines.split(","):
            store = work / (f"scores-{engine}" + (".duckdb" if engine == "duckdb" else ""))
            for stale in work.glob(store.name + "*"):  # a store of an earlier run in --work: cold means empty
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            options = ["--engine", engine] + (["--master", args.master] if engine == "spark" else [])
            for step, catalog in (("cold", plain), ("unchanged", plain), ("1% changed", changed)):
                load = os.getloadavg()[0]
                seconds, peak, report = run_step([*cli, *options, "--catalog", str(catalog), "--store", str(store)],
                                                 work, env)
                scored = sum(m["rows_scored"] for m in report["models"])
                results.append({"engine": engine, "step": step, "rows": report["rows_seen"], "scored": scored,
                                "seconds": round(seconds, 2), "rows_per_s": round(report["rows_seen"] / seconds),
                                "peak_rss_mb": round(peak), "load_before": round(load, 1)})
                r = results[-1]
                print(f"  {engine:7} {step:11} {r['seconds']:8.1f} s {r['rows_per_s']:9,} rows/s  "
                      f"scored {scored:9,}  peak {r['peak_rss_mb']:6,} MB  (load {load:.1f})", flush=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
