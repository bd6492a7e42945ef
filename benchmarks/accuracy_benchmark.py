"""Accuracy on two splits, trained and evaluated as a user would, with the default commands.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_benchmark.py \
        [--catalog ../shared/data/anime_catalog.csv] [--split time] [--split random] [--work DIR]

- random: train on `anime_id % 5 != 0`, evaluate on `anime_id % 5 = 0`;
- time:   train on `year <= 2016`, evaluate on `year >= 2017`: titles newer than any the
          models trained on, the nightly job's real work.

For each split: the training rows are written to Parquet (every column, so `train` sees the
catalog's `year` as a user's would: it may choose the validation rows, never feed a model),
`anime-udf train baseline` and `anime-udf train fusion` run with their defaults plus
`--blend` (timed), and `anime-udf eval --where …` scores the evaluation rows through SQL,
once without the blend (a copy of the bundle without it: exactly the default model, as the
blend is fitted after everything else and changes nothing else) and once with it. The
training mean row is the constant a model would need to beat. Prints one table a split.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CATALOG = ROOT.parent / "shared" / "data" / "anime_catalog.csv"
CLI = [str(Path(sys.executable).parent / "anime-udf")]
SPLITS = {  # name: (training rows, evaluation rows), SQL over the catalog
    "random": ("anime_id % 5 != 0", "anime_id % 5 = 0"),
    "time": ("year <= 2016", "year >= 2017"),
}


def anime_udf(*args: str) -> str:
    return subprocess.run([*CLI, *args], check=True, capture_output=True, text=True).stdout


def run_split(catalog: Path, split: str, work: Path) -> list[dict]:
    train_where, eval_where = SPLITS[split]
    train = work / f"{split}-train.parquet"
    con = duckdb.connect()
    con.execute(f"COPY (SELECT * FROM read_csv_auto('{catalog}') WHERE {train_where}) TO '{train}' (FORMAT parquet)")
    mean = con.execute(f"SELECT avg(score) FROM read_parquet('{train}')").fetchone()[0]
    rows = []
    bundles = []
    for kind in ("baseline", "fusion"):
        out = work / f"{split}-{kind}"
        started = time.perf_counter()
        anime_udf("train", kind, "--data", str(train), "--out", str(out), "--force", "--blend")
        minutes = (time.perf_counter() - started) / 60
        validation = json.loads((out / "manifest.json").read_text())["training"]["validation"]
        bundles.append((kind, out, minutes, validation))
    default = evaluate(catalog, eval_where, [without_blend(out) for _, out, _, _ in bundles])
    blended = evaluate(catalog, eval_where, [out for _, out, _, _ in bundles])
    reference = con.execute(f"SELECT count(*), avg(abs(score - {mean})), sqrt(avg((score - {mean}) ^ 2)) "
                        f"FROM read_csv_auto('{catalog}') WHERE {eval_where} AND score IS NOT NULL").fetchone()
    rows.append({"model": "training mean", "n": reference[0], "mae": reference[1], "rmse": reference[2],
                 "spearman": None, "minutes": None, "validation": ""})
    for kind, _, minutes, validation in bundles:
        how = validation.get("where") or f"random {validation.get('fraction')}"
        rows.append(default[kind] | {"minutes": minutes, "validation": how})
        rows.append(blended[kind] | {"model": f"{kind} --blend", "minutes": None, "validation": how})
    return rows


def evaluate(catalog: Path, where: str, bundles: list[Path]) -> dict[str, dict]:
    """`anime-udf eval` of one bundle of each kind: {kind: its row}."""
    args = ["eval", "--data", str(catalog), "--where", where, "--json"]
    for bundle in bundles:
        args += ["--model", str(bundle)]
    return {row["model"]: row for row in json.loads(anime_udf(*args))}


def without_blend(bundle: Path) -> Path:
    """A copy of ``bundle`` scoring with its head alone: what `train` without --blend trains,
    since the blend is fitted after the heads' epochs are chosen and changes nothing else."""
    copy = bundle.with_name(bundle.name + "-default")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.pop("blend", None)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def print_table(split: str, rows: list[dict]) -> None:
    train_where, eval_where = SPLITS[split]
    print(f"\n{split} split: train on {train_where}, evaluate on {eval_where} ({rows[0]['n']} rows)")
    print("| model | MAE | RMSE | Spearman | train minutes | selection validated on |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        spearman = "–" if r["spearman"] is None else f"{r['spearman']:.3f}"
        minutes = "" if r["minutes"] is None else f"{r['minutes']:.1f}"
        print(f"| {r['model']} | {r['mae']:.3f} | {r['rmse']:.3f} | {spearman} | {minutes} | {r['validation']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--split", action="append", choices=list(SPLITS), help="default: both")
    parser.add_argument("--work", type=Path, help="keep the training files and bundles here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for split in args.split or list(SPLITS):
            print_table(split, run_split(args.catalog.resolve(), split, work))


if __name__ == "__main__":
    main()
