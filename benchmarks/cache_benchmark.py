"""The embedding cache at scale: insert and look-up throughput, and the file's size, for N entries.

    .venv/bin/python benchmarks/cache_benchmark.py 1000000 [--dim 384] [--batch 4096]

Fills a fresh cache (in a temporary directory) with N random 384-d vectors in batches of
``--batch`` (as scoring writes them: one transaction a batch), then looks up ``--lookups``
random batches of existing keys (as a rescore chunk reads them) and a batch of unknown keys.
Prints rows/s for each and the file's size per entry. Nothing is written outside the
temporary directory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from anime_udf.cache import EmbeddingCache, text_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entries", type=int)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--lookups", type=int, default=20, help="random batches looked up (default 20)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    encoder = "sha256:" + "0" * 64 + "|sha256:" + "1" * 64 + "|mean|256|fp32"  # an id of the real ids' length
    keys = [text_key(f"synopsis {i}") for i in range(args.entries)]
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp:
        cache = EmbeddingCache(Path(tmp) / "embeddings.sqlite")
        clock = time.perf_counter()
        for start in range(0, args.entries, args.batch):
            batch = keys[start : start + args.batch]
            vectors = rng.standard_normal((len(batch), args.dim), dtype=np.float32)
            cache.put(encoder, dict(zip(batch, vectors)))
        insert_s = time.perf_counter() - clock
        size = cache.size_bytes()
        clock = time.perf_counter()
        found = 0
        for _ in range(args.lookups):
            picked = [keys[i] for i in rng.choice(args.entries, size=min(args.batch, args.entries), replace=False)]
            found += int(cache.lookup(encoder, picked, args.dim)[1].sum())
        lookup_s = time.perf_counter() - clock
        clock = time.perf_counter()
        missing = cache.lookup(encoder, [text_key(f"never cached {i}") for i in range(args.batch)], args.dim)[1]
        miss_s = time.perf_counter() - clock
    print(json.dumps({
        "entries": args.entries,
        "insert_rows_per_s": round(args.entries / insert_s),
        "lookup_rows_per_s": round(found / lookup_s),
        "miss_rows_per_s": round(args.batch / miss_s),
        "all_found": found == args.lookups * min(args.batch, args.entries) and not missing.any(),
        "file_mb": round(size / 1e6, 1),
        "bytes_per_entry": round(size / args.entries),
    }, indent=2))


if __name__ == "__main__":
    main()
