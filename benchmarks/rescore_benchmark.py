"""Nightly rescoring: cold, warm, 1% changed, and a new baseline head, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/rescore_benchmark.py \
        --catalog ../shared/data/anime_catalog.csv --baseline models/baseline-X

Every step is one `anime_udf.rescore.rescore()` call in this process (interpreter and
torch start-up excluded, the same for every step), on a store and an embedding cache
in a fresh temporary directory, so the first step is truly cold:

1. cold        empty store, empty embedding cache: every synopsis is encoded;
2. warm        the same catalog again: nothing to score (goal: >= 100x faster than cold);
3. 1% changed  a copy of the catalog with 1% of the synopses edited (goal: within 3x of
               1% of the cold time plus the warm time);
4. new head    a second baseline bundle on the same frozen encoder (--new-baseline, or a
               head trained here for a few epochs on the cached embeddings): every row is
               rescored, and no synopsis may be encoded again.

Nothing is written outside the temporary directory (or --work).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CATALOG = ROOT.parent / "shared" / "data" / "anime_catalog.csv"


@contextmanager
def counting_encoder():
    """Count the synopses the frozen text encoder actually encodes (cache misses)."""
    from anime_udf.text import FrozenTextEncoder

    original = FrozenTextEncoder._encode
    counter = {"texts": 0}

    def encode(self, texts, **kwargs):
        counter["texts"] += len(texts)
        return original(self, texts, **kwargs)

    FrozenTextEncoder._encode = encode
    try:
        yield counter
    finally:
        FrozenTextEncoder._encode = original


def changed_copy(catalog: Path, out: Path, fraction: float, seed: int = 0) -> int:
    """``catalog`` with ``fraction`` of its synopses edited, written to ``out``."""
    from anime_udf.catalog import read_catalog

    df = read_catalog(catalog)
    n = max(1, round(df.height * fraction))
    rows = np.random.default_rng(seed).choice(df.height, size=n, replace=False)
    edit = pl.Series(np.isin(np.arange(df.height), rows))
    df = df.with_columns(
        synopsis=pl.when(edit).then(pl.col("synopsis").fill_null("") + " (Edited for the rescore benchmark.)")
        .otherwise(pl.col("synopsis")))
    df.write_parquet(out)
    return n


def train_head(catalog: Path, out: Path, cache_dir: Path, epochs: int) -> Path:
    """A second baseline head on the canonical split, from the (already cached) embeddings."""
    from anime_udf.cache import EmbeddingCache
    from anime_udf.catalog import read_catalog
    from training.baseline import BaselineSettings, train_baseline
    from training.common import DataSplit

    df = read_catalog(catalog, require_score=True)
    valid = df.filter(pl.col("anime_id") % 5 == 0)
    train = df.filter(pl.col("anime_id") % 5 != 0)
    train_baseline(DataSplit(train, valid, train), out, BaselineSettings(epochs=epochs, seed=1234),
                   cache=EmbeddingCache(cache_dir / "embeddings.sqlite"), progress=False, log=lambda _: None)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG, help="default: %(default)s")
    parser.add_argument("--baseline", type=Path, help="baseline bundle (default: the newest in --models)")
    parser.add_argument("--models", type=Path, help="models directory, for the default --baseline")
    parser.add_argument("--new-baseline", type=Path, help="a second baseline bundle (default: train a head here)")
    parser.add_argument("--head-epochs", type=int, default=3, help="epochs of the head trained here")
    parser.add_argument("--change-fraction", type=float, default=0.01)
    parser.add_argument("--work", type=Path, help="keep the store, cache and catalogs here (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from anime_udf.registry import newest
    from anime_udf.rescore import model_id, rescore

    baseline = args.baseline or (newest("baseline", args.models) if args.models else None)
    if baseline is None:
        parser.error("pass --baseline BUNDLE or --models DIR with a baseline bundle in it")
    if not args.catalog.is_file():
        parser.error(f"{args.catalog}: no such catalog")

    with tempfile.TemporaryDirectory(prefix="rescore-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cache = work / "cache"
        os.environ["ANIME_UDF_CACHE"] = str(cache)  # empty: the cold step encodes everything
        store = work / "scores.duckdb"
        for stale in (store, store.with_name(store.name + ".wal")):
            stale.unlink(missing_ok=True)
        results = {}

        def step(name: str, catalog: Path, bundle: Path) -> None:
            with counting_encoder() as encoded:
                start = time.perf_counter()
                report = rescore(catalog, store, models=str(bundle), progress=sys.stderr.isatty())
                seconds = time.perf_counter() - start
            m = report.models[0]
            results[name] = {"seconds": seconds, "rows_seen": report.rows_seen, "rows_scored": m["rows_scored"],
                             "rows_reused": m["rows_reused"], "texts_encoded": encoded["texts"],
                             "model_id": m["model_id"]}
            print(f"  {name:11} {seconds:9.2f} s  scored {m['rows_scored']:6d}  reused {m['rows_reused']:6d}  "
                  f"encoded {encoded['texts']:6d}", flush=True)

        print(f"catalog {args.catalog}; baseline {baseline} ({model_id(baseline)}); work dir {work}", flush=True)
        step("cold", args.catalog, baseline)
        step("warm", args.catalog, baseline)
        changed = work / "catalog-changed.parquet"
        n_changed = changed_copy(args.catalog, changed, args.change_fraction)
        step("1% changed", changed, baseline)
        if args.new_baseline:
            head = args.new_baseline
        else:
            print(f"  (training a second baseline head, {args.head_epochs} epochs, on the cached embeddings)",
                  flush=True)
            head = train_head(args.catalog, work / "models" / "baseline-bench-head", cache, args.head_epochs)
        step("new head", changed, head)

    cold, warm = results["cold"]["seconds"], results["warm"]["seconds"]
    changed_s, head_s = results["1% changed"]["seconds"], results["new head"]["seconds"]
    budget = 3 * (args.change_fraction * cold + warm)
    goals = [
        ("warm vs cold", f"{cold / warm:,.0f}x faster", ">= 100x", cold / warm >= 100),
        (f"1% changed ({n_changed} rows)", f"{changed_s:.2f} s",
         f"<= 3 x ({args.change_fraction:g} x cold + warm) = {budget:.2f} s", changed_s <= budget),
        ("new head", f"{head_s:.2f} s, {results['new head']['texts_encoded']} texts encoded",
         "no re-encoding", results["new head"]["texts_encoded"] == 0),
    ]
    print()
    print(f"{'check':26} {'measured':34} {'goal':44} result")
    for name, measured, goal, ok in goals:
        print(f"{name:26} {measured:34} {goal:44} {'met' if ok else 'MISSED'}")
    if args.json:
        print(json.dumps({"steps": results, "goals": [{"check": g[0], "measured": g[1], "goal": g[2], "met": g[3]}
                                                       for g in goals]}, indent=2))
    return 0 if all(g[3] for g in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
