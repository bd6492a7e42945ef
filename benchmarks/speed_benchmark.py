"""Scoring speed: the SQL functions against the hand-written path, fp32 against bf16, with
start-up, memory and thread figures (issue 8). Every ratio is measured side by side in one run.

    .venv/bin/python benchmarks/speed_benchmark.py --data valid.parquet --catalog all.parquet \
        --baseline models/baseline-X --fusion models/fusion-Y

Needs sentence-transformers for the hand-written baseline path (`pip install -e '.[bench]'`).

1. The machine: the measured fp32 (and bf16) matrix-multiply rate.
2. Throughput on the first --rows rows of --data, every path with an empty embedding cache and
   the model already loaded, in alternating rounds (the best round counts):
   hand-written = `SentenceTransformer.encode(texts, batch_size=64)` + the bundle's heads (baseline);
   `AutoTokenizer(padding=True, truncation=True)` in catalog order, batches of 32, `model(**batch)`,
   mean pooling + the bundle's heads (fusion); SQL = `SELECT predict_score…(…)` through DuckDB.
   FLOPs per row come from the real token counts; "of peak" is the share of the fp32 matmul rate.
3. Accuracy of bf16: every row of --data scored in SQL at fp32 and at bf16 (empty caches):
   the change of MAE and the largest change of a score.
4. Threads: DuckDB `SET threads=1` against `threads=2` (empty caches): rows/s and max |Δ|.
5. Start-up (fresh processes): `--help`, `models`, register + time to the first score, and an
   unchanged nightly `rescore` of --catalog; memory: peak RSS of `anime-udf score` on 5,000 and
   20,000 rows of --catalog (with one new synopsis each, so that the encoder loads in both).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import torch

import anime_udf
from anime_udf.catalog import read_catalog
from anime_udf.features import clean_text
from anime_udf.scoring import SCORE_MAX, SCORE_MIN, Scorer, load_scorer, sentence_embedding
from anime_udf.text import default_encoder_path
from scoring_benchmark import empty_cache  # benchmarks/ is on the path: scripts run from there

INPUTS = ("synopsis", "genres", "studio", "episodes")
FUNCTIONS = {"baseline": "predict_score", "fusion": "predict_score_fusion"}


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n×n by n×n matrix multiply, the best of ``repeats``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flops_per_row(texts: list[str], tokenizer, config, max_length: int) -> tuple[float, float]:
    """(mean tokens, mean forward FLOPs) per text for a BERT-style encoder: per layer, the Q/K/V/output
    projections and the feed-forward (2·L·(4d² + 2·d·ff)) plus attention scores and mixing (4·L²·d)."""
    lengths = np.array([len(x) for x in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]])
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_text = layers * (2 * lengths * (4 * d * d + 2 * d * ff) + 4 * lengths**2 * d)
    return float(lengths.mean()), float(per_text.mean())


def heads(scorer: Scorer, embeddings: np.ndarray, df: pl.DataFrame) -> np.ndarray:
    """What a notebook does after encoding: the bundle's tabular features, lexical view and heads."""
    dense, studio = scorer.features.encode(*(df[c].to_list() for c in INPUTS[1:]))
    extra = scorer._extra_inputs([clean_text(t) for t in df["synopsis"].to_list()])
    with torch.inference_mode():
        out = scorer.net(*(torch.from_numpy(a) for a in (sentence_embedding(embeddings), dense, studio, *extra)))
    return np.clip(out.numpy().astype(np.float64) * scorer.target_std + scorer.target_mean, SCORE_MIN, SCORE_MAX)


class HandWritten:
    """The paths an analyst would write by hand, given the bundle."""

    def __init__(self, baseline: Scorer | None, fusion: Scorer | None):
        from sentence_transformers import SentenceTransformer
        from transformers import AutoModel, AutoTokenizer

        self.baseline, self.fusion = baseline, fusion
        self.sentence_transformer = SentenceTransformer(str(default_encoder_path()), device="cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(str(default_encoder_path()))
        self.model = AutoModel.from_pretrained(str(default_encoder_path())).eval()

    def score_baseline(self, df: pl.DataFrame, bf16: bool) -> np.ndarray:
        texts = [clean_text(t) for t in df["synopsis"].to_list()]
        with autocast(bf16):
            embeddings = self.sentence_transformer.encode(texts, batch_size=64, convert_to_numpy=True)
        return heads(self.baseline, embeddings.astype(np.float32), df)

    def score_fusion(self, df: pl.DataFrame, bf16: bool) -> np.ndarray:
        texts = [clean_text(t) for t in df["synopsis"].to_list()]
        pooled = []
        with torch.inference_mode(), autocast(bf16):
            for start in range(0, len(texts), 32):
                batch = self.tokenizer(texts[start : start + 32], padding=True, truncation=True, max_length=256,
                                       return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).float()
                pooled.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
        return heads(self.fusion, np.concatenate(pooled), df)


def sql_scores(bundles: dict[str, Path], df: pl.DataFrame, precision: str, threads: int = 2) -> dict[str, np.ndarray]:
    """Each function's scores for ``df`` through DuckDB, each timed, with an empty cache; the
    bundles are loaded (by scoring a row with no synopsis) before the clock starts."""
    out = {}
    for kind, bundle in bundles.items():
        with empty_cache():
            con = duckdb.connect()
            con.execute(f"SET threads = {threads}")
            anime_udf.register(con, **{kind: bundle}, precision=precision)
            fn = FUNCTIONS[kind]
            con.execute(f"SELECT {fn}(NULL, NULL, NULL, NULL)").fetchall()
            con.register("rows", df.with_row_index("i"))
            start = time.perf_counter()
            scores = con.sql(f"SELECT {fn}(synopsis, genres, studio, episodes) FROM rows ORDER BY i").fetchnumpy()
            out[kind] = (time.perf_counter() - start, next(iter(scores.values())))
    return out


def throughput(bundles: dict[str, Path], df: pl.DataFrame, rounds: int, peak: float, flops: float) -> None:
    scorers = {kind: load_scorer(b) for kind, b in bundles.items()}
    hand = HandWritten(scorers.get("baseline"), scorers.get("fusion"))
    hand_paths = {"baseline": hand.score_baseline, "fusion": hand.score_fusion}
    best: dict[tuple[str, str, str], float] = {}
    scores: dict[tuple[str, str, str], np.ndarray] = {}
    for _ in range(rounds):
        for precision in ("fp32", "bf16"):
            for kind, fn in hand_paths.items():
                if kind in bundles:
                    start = time.perf_counter()
                    scores[kind, "hand-written", precision] = fn(df, precision == "bf16")
                    seconds = time.perf_counter() - start
                    best[kind, "hand-written", precision] = min(seconds, best.get((kind, "hand-written", precision), 1e9))
            for kind, (seconds, s) in sql_scores(bundles, df, precision).items():
                scores[kind, "SQL", precision] = s
                best[kind, "SQL", precision] = min(seconds, best.get((kind, "SQL", precision), 1e9))
    print(f"\n## Throughput: {df.height} rows, empty caches, best of {rounds} alternating rounds")
    print(f"{'model':9} {'path':13} {'precision':9} {'rows/s':>8} {'vs hand-written':>16} {'vs SQL fp32':>12} "
          f"{'of fp32 peak':>13} {'max |Δ| to hand-written fp32':>29}")
    for kind in bundles:
        for precision in ("fp32", "bf16"):
            for path in ("hand-written", "SQL"):
                rate = df.height / best[kind, path, precision]
                hand_rate = df.height / best[kind, "hand-written", precision]
                sql32 = df.height / best[kind, "SQL", "fp32"]
                delta = np.abs(scores[kind, path, precision] - scores[kind, "hand-written", "fp32"]).max()
                print(f"{kind:9} {path:13} {precision:9} {rate:8.1f} {rate / hand_rate:15.2f}x {rate / sql32:11.2f}x "
                      f"{rate * flops / peak:12.0%} {delta:29.5f}")


def accuracy(bundles: dict[str, Path], df: pl.DataFrame) -> None:
    print(f"\n## bf16 against fp32, SQL, all {df.height} rows of --data, empty caches")
    by_precision = {p: sql_scores(bundles, df, p) for p in ("fp32", "bf16")}
    y = df["score"].to_numpy()
    for kind in bundles:
        (t32, s32), (t16, s16) = by_precision["fp32"][kind], by_precision["bf16"][kind]
        mae32, mae16 = np.abs(s32 - y).mean(), np.abs(s16 - y).mean()
        print(f"{kind:9} fp32 {df.height / t32:6.1f} rows/s, bf16 {df.height / t16:6.1f} rows/s ({t32 / t16:.2f}x); "
              f"MAE {mae32:.4f} -> {mae16:.4f} (Δ {mae16 - mae32:+.4f}); max |score Δ| {np.abs(s16 - s32).max():.4f}")


def threads(bundles: dict[str, Path], df: pl.DataFrame) -> None:
    print(f"\n## DuckDB threads, SQL, {df.height} rows, default precision, empty caches")
    one, two = sql_scores(bundles, df, "auto", threads=1), sql_scores(bundles, df, "auto", threads=2)
    for kind in bundles:
        print(f"{kind:9} threads=1 {df.height / one[kind][0]:6.1f} rows/s, threads=2 {df.height / two[kind][0]:6.1f} "
              f"rows/s; max |Δ| {np.abs(one[kind][1] - two[kind][1]).max():.2e}")


def run_measured(args: list[str]) -> tuple[float, str]:
    """(seconds, stdout) of a fresh process."""
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed: {proc.stderr[-2000:]}")
    return seconds, proc.stdout


def measured_cli(*args: str) -> tuple[float, float]:
    """Seconds and peak RSS of `anime-udf ARGS` in a fresh interpreter."""
    # VmHWM, not getrusage: ru_maxrss survives fork + exec, so it would report this process's peak.
    code = ("import re, sys\n"
            "from anime_udf.cli import cli\n"
            "try:\n    cli(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "kb = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
            "print('PEAK_RSS_MB=%.1f' % (int(kb) / 1024))\n")
    seconds, stdout = run_measured([sys.executable, "-c", code, *args])
    return seconds, float(stdout.rsplit("PEAK_RSS_MB=", 1)[1].split()[0])


FIRST_SCORE = """
import sys, time, duckdb
t0 = time.perf_counter()
import anime_udf
con = duckdb.connect()
anime_udf.register(con, baseline=sys.argv[1])
t1 = time.perf_counter()
con.sql(f"SELECT predict_score('A story never scored before: {time.time()}', 'Drama', 'Madhouse', 12)").fetchall()
print(f"{t1 - t0:.3f} {time.perf_counter() - t1:.3f}")
"""


def startup_and_memory(bundles: dict[str, Path], catalog: Path, models_dir: Path) -> None:
    print("\n## Start-up (fresh processes)")
    for label, args in (("anime-udf --help", ["--help"]), ("anime-udf models", ["models", "--models", str(models_dir)])):
        seconds, rss = measured_cli(*args)
        print(f"{label:40} {seconds:6.2f} s {rss:7.0f} MB")
    _, out = run_measured([sys.executable, "-c", FIRST_SCORE, str(bundles["baseline"])])
    register_s, first_s = map(float, out.split())
    print(f"{'import anime_udf + register(con)':40} {register_s:6.2f} s; the first score of a new synopsis "
          f"(imports torch, loads the model and the encoder) {first_s:.2f} s more")
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "scores.duckdb"
        cold, _ = measured_cli("rescore", "--catalog", str(catalog), "--store", str(store), "--models", str(models_dir))
        unchanged, rss = measured_cli("rescore", "--catalog", str(catalog), "--store", str(store),
                                      "--models", str(models_dir))
        print(f"{'rescore, first run (embedding cache as is)':40} {cold:6.2f} s")
        print(f"{'rescore, unchanged catalog':40} {unchanged:6.2f} s {rss:7.0f} MB")

        print("\n## Memory: peak RSS of `anime-udf score` (fresh processes, default precision)")
        full = read_catalog(catalog)
        for rows in (5_000, 20_000):
            data = Path(tmp) / f"rows{rows}.parquet"
            repeated = pl.concat([full] * (rows // full.height + 1)).head(rows - 1)
            fresh = repeated.head(1).with_columns(synopsis=pl.lit(f"A new synopsis, never scored: {time.time()}"))
            pl.concat([repeated, fresh]).write_parquet(data)
            seconds, rss = measured_cli("score", "--data", str(data), "--out", str(Path(tmp) / "out.parquet"),
                                        "--models", str(models_dir))
            print(f"{rows:6d} rows {seconds:7.1f} s {rss:7.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="Scored catalog for throughput and accuracy.")
    parser.add_argument("--catalog", type=Path, required=True, help="Catalog for the rescore and memory figures.")
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--fusion", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.baseline.parent != args.fusion.parent:
        parser.error("--baseline and --fusion must be in one models directory (for the CLI figures)")
    bundles = {"baseline": args.baseline, "fusion": args.fusion}
    df = read_catalog(args.data, require_score=True)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    peak = matmul_rate(torch.float32)
    print(f"matrix multiply (2048³): fp32 {peak / 1e9:.0f} GFLOP/s, bf16 {matmul_rate(torch.bfloat16) / 1e9:.0f} GFLOP/s")
    sample = df.head(args.rows)
    hand = HandWritten(None, None)
    tokens, flops = flops_per_row([clean_text(t) for t in sample["synopsis"].to_list()], hand.tokenizer,
                                  hand.model.config, 256)
    del hand
    print(f"{sample.height} rows: {tokens:.0f} tokens a row on average, {flops / 1e9:.2f} GFLOP a row")

    throughput(bundles, sample, args.rounds, peak, flops)
    accuracy(bundles, df)
    threads(bundles, sample)
    startup_and_memory(bundles, args.catalog, args.baseline.parent)


if __name__ == "__main__":
    main()
