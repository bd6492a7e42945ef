"""A plain reference for the fusion model, written from its description (issue 26), and the
switches that make it behave like `anime-udf train fusion` one difference at a time.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 ANIME_UDF_CACHE=/tmp/anime-cache \\
        .venv/bin/python benchmarks/reference_fusion.py [--split time] [--split random] \\
        [--seeds 0 1 2] [--like-fusion NAME ...] [--epochs 100] [--precision fp32] [--shipped]

The reference, exactly: the same four inputs the SQL functions take, no others.

- text: the packaged all-MiniLM-L6-v2 (anime_udf's FrozenTextEncoder and its embedding cache, so
  `train` and this script encode a synopsis once), fp32, 256 tokens, mean-pooled, L2-normalised;
- genres multi-hot over the training rows' genres; one column per studio with >= 3 training
  titles (any other studio, and NULL, all zeros); log1p(episodes) (NULL or negative: 0) and a
  0/1 missing flag; no other scaling;
- lexical score: TfidfVectorizer(sublinear_tf=True, min_df=2, ngram_range=(1, 2)) on the cleaned
  synopsis, Ridge(alpha=1.0) on the raw score; out-of-fold (KFold(5, shuffle, random_state=0)) for
  the training rows, one ridge on every training row for the evaluated rows; standardised with
  the training scores' mean and deviation;
- head: Linear(d, 256) ReLU Dropout(0.5) Linear(256, 128) ReLU Linear(128, 1) on [text, genres,
  studios, log-episodes, missing, lexical], MSE on the standardised score, AdamW(1e-3, wd 0.01),
  batches of 64 reshuffled every epoch, cosine annealing stepped once per epoch over 100 epochs,
  gradient norm clipped at 5; trained once on every training row; seeds averaged, de-standardised
  and clipped to [1, 10].

Each ``--like-fusion`` switch (``LIKE_FUSION``) changes one thing to what `train fusion` does;
``--seeds 42 43 44`` and ``--precision`` / ``--eval-precision`` cover the seeds and the
embeddings. ``--shipped`` also trains the default baseline and fusion and evaluates them through
`anime-udf eval` (benchmarks/accuracy_benchmark.py) on the same split. Metrics are those of
`anime-udf eval` (anime_udf.metrics); the spread is that of the single seeds.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold
from torch import nn

from anime_udf.cache import EmbeddingCache
from anime_udf.catalog import read_catalog
from anime_udf.features import clean_text, log_episodes, parse_genres, studio_key
from anime_udf.metrics import compute_metrics
from anime_udf.text import FrozenTextEncoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_benchmark import DEFAULT_CATALOG, SPLITS, run_split  # noqa: E402

# What `train fusion` does differently, one switch each (the reference does none of them); the
# bisection of issue 26 measured each on the time split.
LIKE_FUSION = {
    "selection": "epochs chosen as train fusion chooses them: a selection run fitted on all but the newest "
                 "15%% of the training rows' years, validated on those, schedules of 30/60/90/120 epochs",
    "scaled-episodes": "log episodes standardised with the training mean and deviation (missing: the mean)",
    "unknown-studio": "a learned column for the unknown studio (rare or NULL), as train had until issue 26 "
                      "(it cost 0.006 MAE and Spearman on new titles; the studio now weighs nothing)",
    "lexical-seed": "the out-of-fold KFold's random_state 42 (train's --seed) instead of 0",
    "step-cosine": "cosine annealing stepped every batch instead of every epoch",
}


def load_rows(catalog: Path, where: str) -> pl.DataFrame:
    import duckdb

    con = duckdb.connect()
    return read_catalog(con.sql(f"SELECT * FROM read_csv_auto('{catalog}') WHERE {where}").pl(), require_score=True)


def embeddings(df: pl.DataFrame, precision: str) -> np.ndarray:
    encoder = FrozenTextEncoder(pooling="mean", max_length=256, cache=EmbeddingCache(), device="cpu",
                                precision=precision)
    e = encoder.embed(df["synopsis"].to_list())
    return (e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def tabular(train: pl.DataFrame, rows: pl.DataFrame, like: set[str]) -> np.ndarray:
    """[genres multi-hot, studio one-hot, log episodes, missing flag], vocabularies of ``train``."""
    genres = sorted({g for v in train["genres"].to_list() for g in parse_genres(v)})
    counts = pl.Series([studio_key(s) for s in train["studio"].to_list()]).value_counts()
    studios = sorted(s for s, n in counts.iter_rows() if s and n >= 3)
    studio_col = {s: i + ("unknown-studio" in like) for i, s in enumerate(studios)}
    n_studio = len(studios) + ("unknown-studio" in like)
    x = np.zeros((rows.height, len(genres) + n_studio + 2), dtype=np.float32)
    genre_col = {g: i for i, g in enumerate(genres)}
    for r, value in enumerate(rows["genres"].to_list()):
        for g in parse_genres(value):
            if g in genre_col:
                x[r, genre_col[g]] = 1.0
    for r, value in enumerate(rows["studio"].to_list()):
        col = studio_col.get(studio_key(value), 0 if "unknown-studio" in like else None)
        if col is not None:
            x[r, len(genres) + col] = 1.0
    logs = np.array([np.nan if v is None else v for v in map(log_episodes, rows["episodes"].to_list())])
    if "scaled-episodes" in like:
        train_logs = np.array([v for v in map(log_episodes, train["episodes"].to_list()) if v is not None])
        logs = (logs - train_logs.mean()) / train_logs.std()
    x[:, -2] = np.nan_to_num(logs, nan=0.0)
    x[:, -1] = np.isnan(logs)
    return x


def lexical(train: pl.DataFrame, rows: pl.DataFrame, like: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """Standardised lexical scores: out-of-fold for ``train``, one ridge on all of it for ``rows``."""
    def fit(texts, y):
        vectorizer = TfidfVectorizer(sublinear_tf=True, min_df=2, ngram_range=(1, 2))
        return vectorizer, Ridge(alpha=1.0).fit(vectorizer.fit_transform(texts), y)

    def predict(model, texts):
        return model[1].predict(model[0].transform(texts))

    texts = [clean_text(t) for t in train["synopsis"].to_list()]
    y = train["score"].to_numpy()
    oof = np.zeros(len(texts))
    folds = KFold(5, shuffle=True, random_state=42 if "lexical-seed" in like else 0)
    for fit_rows, held in folds.split(texts):
        oof[held] = predict(fit([texts[i] for i in fit_rows], y[fit_rows]), [texts[i] for i in held])
    scores = predict(fit(texts, y), [clean_text(t) for t in rows["synopsis"].to_list()])
    return ((oof - y.mean()) / y.std()).astype(np.float32), ((scores - y.mean()) / y.std()).astype(np.float32)


def inputs(train: pl.DataFrame, rows: pl.DataFrame, like: set[str], precision: str,
           eval_precision: str) -> tuple[np.ndarray, np.ndarray]:
    """The head's input matrices of ``train`` (out-of-fold lexical scores) and ``rows``."""
    lex_train, lex_rows = lexical(train, rows, like)
    return (np.hstack([embeddings(train, precision), tabular(train, train, like), lex_train[:, None]]),
            np.hstack([embeddings(rows, eval_precision), tabular(train, rows, like), lex_rows[:, None]]))


def head(d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 128), nn.ReLU(),
                         nn.Linear(128, 1))


def fit_predict(x: np.ndarray, z: np.ndarray, x_rows: np.ndarray, seed: int, epochs: int,
                like: set[str]) -> np.ndarray:
    """One head trained on (x, z) from ``seed``; its standardised predictions for ``x_rows``."""
    torch.manual_seed(seed)
    net = head(x.shape[1])
    x_t, z_t = torch.from_numpy(x), torch.from_numpy(z)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    per_step = "step-cosine" in like
    t_max = epochs * math.ceil(len(z) / 64) if per_step else epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
    shuffle = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(z), generator=shuffle).split(64):
            loss = nn.functional.mse_loss(net(x_t[idx]).squeeze(-1), z_t[idx])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            optimizer.step()
            if per_step:
                scheduler.step()
        if not per_step:
            scheduler.step()
    with torch.inference_mode():
        return net.eval()(torch.from_numpy(x_rows)).squeeze(-1).numpy()


def choose_epochs(train: pl.DataFrame, args: argparse.Namespace, like: set[str]) -> int:
    """The `selection` switch: train fusion's selection run (its rows, its schedules, the whole
    seed ensemble validated at each schedule's end)."""
    from training.common import newest_years, rows_where

    is_valid = rows_where(train, newest_years(train)).to_numpy()
    fit, valid = train.filter(~is_valid), train.filter(is_valid)
    x, x_valid = inputs(fit, valid, like, args.precision, args.precision)
    y = fit["score"].to_numpy()
    z, z_valid = ((y - y.mean()) / y.std()).astype(np.float32), (valid["score"].to_numpy() - y.mean()) / y.std()
    rmse = {}
    for epochs in (30, 60, 90, 120):
        pred = np.mean([fit_predict(x, z, x_valid, s, epochs, like) for s in args.seeds], axis=0)
        rmse[epochs] = float(np.sqrt(np.mean((pred - z_valid) ** 2)))
    print(f"  selection run: validation RMSE (standardised) {rmse}", flush=True)
    return min(rmse, key=rmse.get)


def reference(catalog: Path, split: str, args: argparse.Namespace) -> dict:
    like = set(args.like_fusion)
    train_where, eval_where = SPLITS[split]
    train, rows = load_rows(catalog, train_where), load_rows(catalog, eval_where)
    started = time.perf_counter()
    epochs = choose_epochs(train, args, like) if "selection" in like else args.epochs
    x, x_rows = inputs(train, rows, like, args.precision, args.eval_precision or args.precision)
    y = train["score"].to_numpy()
    z = ((y - y.mean()) / y.std()).astype(np.float32)
    preds = [np.clip(fit_predict(x, z, x_rows, s, epochs, like) * y.std() + y.mean(), 1, 10) for s in args.seeds]
    truth = rows["score"].to_numpy()
    singles = [compute_metrics(truth, p) for p in preds]
    return compute_metrics(truth, np.mean(preds, axis=0)) | {
        "epochs": epochs, "minutes": (time.perf_counter() - started) / 60,
        "spread": {k: float(np.std([m[k] for m in singles])) for k in ("mae", "rmse", "spearman")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--split", action="append", choices=list(SPLITS), help="default: time")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=100, help="the schedule (without --like-fusion selection)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="the training rows' embeddings")
    parser.add_argument("--eval-precision", choices=["fp32", "bf16"], help="the evaluated rows' (default: --precision)")
    parser.add_argument("--like-fusion", action="append", default=[], choices=list(LIKE_FUSION),
                        help="do this as train fusion does: " + "; ".join(f"{k}: {v}" for k, v in LIKE_FUSION.items()))
    parser.add_argument("--shipped", action="store_true",
                        help="also train the default baseline and fusion and evaluate them through anime-udf eval")
    parser.add_argument("--work", type=Path, default=Path("/tmp/reference-fusion"), help="--shipped's files")
    args = parser.parse_args()
    catalog = args.catalog.resolve()
    for split in args.split or ["time"]:
        r = reference(catalog, split, args)
        switches = ", ".join(args.like_fusion) or "none"
        print(f"\n{split} split: {SPLITS[split]}; like fusion: {switches}; seeds {args.seeds}; "
              f"embeddings {args.precision}/{args.eval_precision or args.precision}")
        print("| model | MAE | RMSE | Spearman | epochs | minutes | seed spread (MAE/RMSE/Spearman) |")
        print("|---|---|---|---|---|---|---|")
        spread = "/".join(f"{r['spread'][k]:.4f}" for k in ("mae", "rmse", "spearman"))
        print(f"| reference | {r['mae']:.4f} | {r['rmse']:.4f} | {r['spearman']:.4f} | {r['epochs']} | "
              f"{r['minutes']:.1f} | {spread} |")
        if args.shipped:
            args.work.mkdir(parents=True, exist_ok=True)
            for row in run_split(catalog, split, args.work)[1:]:
                minutes = "" if row["minutes"] is None else f"{row['minutes']:.1f}"
                print(f"| {row['model']} | {row['mae']:.4f} | {row['rmse']:.4f} | {row['spearman']:.4f} | | "
                      f"{minutes} | |", flush=True)


if __name__ == "__main__":
    main()
