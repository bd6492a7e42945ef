"""How far bf16 scores are from fp32 scores (the precision contract of `--precision auto`), in one run:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/precision_benchmark.py --data ../shared/data/anime_catalog.csv \
        --model models/baseline-... --model models/fusion-...

Each bundle scores the catalog's rows (--rows of them, evenly spaced; 0: all) once with the text
encoder in fp32 and once in bf16, from an empty embedding cache, and prints per model the largest,
the 99.9th and the 99th percentile and the mean absolute difference, with the CPU it ran on. Run it
once more with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` for a CPU without native bf16.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from anime_udf.catalog import read_catalog
from anime_udf.columns import INPUT_COLUMNS
from anime_udf.scoring import load_scorer
from encoder_benchmark import cpu_model  # a sibling script: benchmarks/ is on sys.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", action="append", required=True, help="a bundle directory (repeatable)")
    parser.add_argument("--rows", type=int, default=0)
    args = parser.parse_args()
    catalog = read_catalog(args.data)
    if args.rows:
        catalog = catalog.gather(np.linspace(0, catalog.height - 1, args.rows).astype(int))
    inputs = [catalog[c].to_list() for c in INPUT_COLUMNS]
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    print(f"{cpu_model()} (oneDNN ISA: {isa}), {catalog.height} rows of {args.data}")
    print(f"{'model':>10} {'max':>8} {'p99.9':>8} {'p99':>8} {'mean':>8}   |bf16 - fp32|")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["ANIME_UDF_CACHE"] = cache  # every embedding computed here, in each precision
        for bundle in args.model:
            fp32, bf16 = (load_scorer(bundle, precision=p) for p in ("fp32", "bf16"))
            diff = np.abs(bf16.predict(*inputs) - fp32.predict(*inputs))
            print(f"{fp32.kind:>10} {diff.max():8.4f} {np.quantile(diff, 0.999):8.4f} "
                  f"{np.quantile(diff, 0.99):8.4f} {diff.mean():8.4f}")


if __name__ == "__main__":
    main()
