"""`dbt build` of examples/dbt on a warehouse file: cold, then incremental, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dbt_benchmark.py \
        --catalog ../shared/data/anime_catalog.csv --models models/demo

In a fresh temporary directory (or --work): the catalog is loaded into `warehouse.duckdb`
as table `anime` (through `anime-udf sql --db … --write`, so it is validated as any
catalog), the example project is copied beside it, and

1. cold         `dbt build` with an empty embedding cache: the table model scores every row
                with both models, the incremental model is built from scratch, the tests run;
2. incremental  after --changed of the synopses are edited and --added rows are added in the
                warehouse, `dbt build --select anime_scores_incremental` (the nightly job: the
                model and its tests): only the edited and added rows are scored, and their
                synopses encoded;
3. whole        the same edits again, then `dbt build`: the table model rescores every row
                (embeddings cached but the new ones), the incremental model the edited rows.

Each step is a whole `dbt` process (interpreter, dbt, torch and model loading included);
the incremental model's own time and the rows it scored are read back from dbt's
run_results.json and the model's table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CATALOG = ROOT.parent / "shared" / "data" / "anime_catalog.csv"


def dbt_build(project: Path, env: dict[str, str], *args: str) -> tuple[float, dict[str, float], str]:
    """Wall seconds of one `dbt build`, each model's own seconds, and the invocation id."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", "from dbt.cli.main import cli; cli()", "build", *args,
                             "--project-dir", str(project), "--profiles-dir", str(project)],
                            cwd=project, env={**os.environ, **env}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"dbt build failed:\n{result.stdout}\n{result.stderr}")
    run_results = json.loads((project / "target" / "run_results.json").read_text())
    models = {r["unique_id"].split(".")[-1]: r["execution_time"] for r in run_results["results"]
              if r["unique_id"].startswith("model.")}
    return seconds, models, run_results["metadata"]["invocation_id"]


def edit(warehouse: Path, changed: int, added: int) -> None:
    """Edit ``changed`` synopses and add ``added`` rows (copies of the first rows under new keys)."""
    con = duckdb.connect(str(warehouse))
    con.execute("UPDATE anime SET synopsis = synopsis || ' (Edited for the benchmark.)' "
                f"WHERE anime_id IN (SELECT anime_id FROM anime USING SAMPLE {changed} ROWS (reservoir, 0))")
    con.execute("INSERT INTO anime BY NAME SELECT anime_id + (SELECT max(anime_id) FROM anime) AS anime_id, "
                "'A new title, added for the benchmark, number ' || anime_id AS synopsis, "
                f"* EXCLUDE (anime_id, synopsis) FROM anime ORDER BY anime_id LIMIT {added}")
    con.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--models", type=Path, required=True, help="Directory with a baseline and a fusion bundle.")
    parser.add_argument("--changed", type=float, default=0.01, help="Share of synopses edited before step 2.")
    parser.add_argument("--added", type=int, default=20, help="Rows added before step 2.")
    parser.add_argument("--work", type=Path, help="Working directory (default: a temporary one).")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="dbt-benchmark-"))
    project = shutil.copytree(ROOT / "examples" / "dbt", work / "project")
    warehouse = work / "warehouse.duckdb"
    env = {"ANIME_UDF_MODELS": str(args.models.resolve()), "ANIME_UDF_WAREHOUSE": str(warehouse),
           "ANIME_UDF_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}
    subprocess.run([sys.executable, "-c", "from anime_udf.cli import cli; cli()", "sql", "--db", str(warehouse), "--write",
                    "--table", f"catalog={args.catalog}", "CREATE TABLE anime AS SELECT * FROM catalog"],
                   check=True, env={**os.environ, **env}, capture_output=True)
    con = duckdb.connect(str(warehouse), read_only=True)
    rows = con.execute("SELECT count(*) FROM anime").fetchone()[0]
    con.close()
    print(f"warehouse {warehouse}: {rows} rows in table anime; dbt project {project}")

    cold, cold_models, _ = dbt_build(project, env)
    print(f"cold        dbt build {cold:7.1f} s   (table model {cold_models['anime_scores']:.1f} s, "
          f"incremental model {cold_models['anime_scores_incremental']:.1f} s: {rows} rows each)")

    changed = round(rows * args.changed)
    for step, select in (("incremental", ("--select", "anime_scores_incremental")), ("whole", ())):
        edit(warehouse, changed, args.added)
        seconds, models, invocation = dbt_build(project, env, *select)
        con = duckdb.connect(str(warehouse), read_only=True)
        scored = con.execute("SELECT count(*) FROM anime_scores_incremental WHERE scored_by_invocation = ?",
                             [invocation]).fetchone()[0]
        con.close()
        table = f"table model {models['anime_scores']:.1f} s, " if "anime_scores" in models else ""
        print(f"{step:11} dbt build {seconds:7.1f} s   ({table}incremental model "
              f"{models['anime_scores_incremental']:.1f} s: {scored} rows scored = {changed} edited + "
              f"{args.added} added)")


if __name__ == "__main__":
    main()
