"""The anime-udf command line: train · score · eval · explain · sql · models · promote · compare · rescore · cache.

Each command parses its options and makes one call into the library; cli_common.py holds what they share.
Commands import torch, DuckDB or polars only where they need them: --help and `models` start in a fraction
of a second, and a nightly run with nothing to score skips torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from anime_udf.bundle import KINDS
from anime_udf.cli_common import (CATALOG, JsonFailures, PluginGroup, bundle_options, engine_options, model_option,
                                  models_option, parse_age, parse_tables, parse_where, require_file,
                                  scoring_options)
from anime_udf.columns import DEFAULT_KEY


@click.group(cls=PluginGroup)
@click.version_option(package_name="anime-udf")
@click.option("--debug", is_flag=True, help="Show the full traceback of an unexpected error.")
def cli(debug):
    """Score an anime catalog with deep-learning models from plain SQL.

    \b
    Quick start:
      anime-udf train baseline --data fixtures/catalog.csv
      anime-udf sql "SELECT title, predict_score(synopsis, genres, studio, episodes) FROM anime" \\
          --table anime=fixtures/catalog.csv
      anime-udf eval --data fixtures/catalog.csv
    """
    import warnings

    # A warning is one line for the user (an unusable embedding cache, say), not a source line.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"Warning: {message}\n"


@cli.command()
@click.argument("query")
@click.option("--db", "database", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.duckdb",
              help="Run the query in this DuckDB database: its tables are the query's (read-only unless --write: "
                   "ATTACH and DETACH are refused).")
@click.option("--write", is_flag=True, help="Open --db for writing (created if missing): CREATE, INSERT, UPDATE... "
                                            "The query runs as one transaction: all of it is saved, or nothing.")
@click.option("--table", "tables", multiple=True, metavar="NAME=FILE",
              help="Expose a catalog (CSV, Parquet or FILE.duckdb:TABLE) to the query as a view NAME (repeatable).")
@model_option("Bundle to register")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the result to .parquet or .csv.")
@click.option("--limit", default=50, show_default=True, help="Rows to print (without --out).")
@bundle_options
def sql(query, database, write, tables, model_paths, out, limit, models_dir, device, precision):
    """Run QUERY with predict_score / predict_score_fusion (each where the models directory has a
    bundle of its kind; a query that scores nothing needs none) and the macros of sql/metrics.sql
    and sql/report.sql available.

    \b
    anime-udf sql "SELECT title, predict_score(synopsis, genres, studio, episodes) AS p
                   FROM anime ORDER BY p DESC LIMIT 5" --table anime=catalog.parquet
    anime-udf sql --db warehouse.duckdb "SELECT title, predict_score_fusion(synopsis, genres,
                   studio, episodes) AS p FROM anime ORDER BY p DESC LIMIT 5"
    anime-udf sql --db warehouse.duckdb --write "CREATE TABLE anime AS FROM 'catalog.csv'"
    """
    from anime_udf.warehouse import format_result, run_sql

    df = run_sql(query, views=parse_tables(tables), database=database, write=write, out=out,
                 model_paths=model_paths, models_dir=models_dir, device=device, precision=precision)
    if df is not None:
        click.echo(f"wrote {df.height} rows to {out}" if out else format_result(df, limit))


@cli.command()
@click.option("--data", required=True, type=CATALOG,
              help="Catalog to score: CSV, Parquet or a DuckDB table as FILE.duckdb:TABLE (with --engine spark, "
                   "a Parquet file, directory or glob).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output .parquet or .csv, not the --data file: the catalog plus one score column per model "
                   "(with --engine spark, a directory of Parquet files). A column the catalog already has under "
                   "the name of a function scored (a scored file scored again) is replaced by this run's scores.")
@model_option("Bundle(s) to score with")
@engine_options
@bundle_options
def score(data, out, model_paths, engine, master, ship, spark_conf, models_dir, device, precision):
    """Score a whole catalog file with every registered model.

    \b
      anime-udf score --data catalog.parquet --out scored.parquet
      anime-udf score --data warehouse.duckdb:anime --out scored.parquet
      anime-udf score --engine spark --data 'catalog/*.parquet' --out scored/
    """
    require_file(data, "--data", engine)
    if engine == "spark":
        from anime_udf.spark import score_catalog

        scored = score_catalog(data, out, model_paths=model_paths, models_dir=models_dir, device=device,
                               precision=precision, master=master, conf=spark_conf, ship=ship)
    else:
        from anime_udf.udf import score_catalog

        scored = score_catalog(data, out, model_paths=model_paths, models_dir=models_dir, device=device,
                               precision=precision)
    click.echo(scored.summary(out, " on Spark" if engine == "spark" else ""))


@cli.command(name="eval")
@click.option("--data", required=True, type=CATALOG,
              help="Catalog with a score column (CSV, Parquet or FILE.duckdb:TABLE); rows with a NULL score are "
                   "skipped and counted.")
@model_option("Bundle(s) to evaluate", ", side by side")
@click.option("--where", "where",
              help="One SQL expression filtering the catalog, e.g. \"anime_id % 5 = 0\" (statements, "
                   "UNIONs and comments are refused; it cannot read files).")
@click.option("--json", "as_json", is_flag=True, help="Print the models' metrics as JSON.")
@click.option("--level", type=click.FloatRange(0, 1, min_open=True, max_open=True), metavar="LEVEL",
              help="Also score each model's prediction intervals at LEVEL (e.g. 0.9) and print their coverage "
                   "(the share of rows inside), mean width and interval score (lower is better), beside the "
                   "reference of a constant width calibrated on the same rows.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.html",
              help="Also write a self-contained HTML report: metrics, predicted vs actual, residuals, error by "
                   "genre / episodes / studio, calibration, what each model listens to (the mean part of each "
                   "input group), the prediction intervals (coverage against the level from 0.5 to 0.95; "
                   "coverage and width by band of the score, genre and episodes at --level, else 0.9) and the "
                   "largest misses with their parts and intervals (opens offline).")
@bundle_options
def evaluate(data, model_paths, where, as_json, level, report, models_dir, device, precision):
    """n, MAE, RMSE, Spearman and R² of each model, computed in SQL (sql/metrics.sql), beside the
    reference of predicting the training mean (what a model must beat); with --level, the
    coverage, mean width and interval score of its prediction intervals.

    \b
    anime-udf eval --data valid.parquet --where "anime_id % 5 = 0" --report report.html
    anime-udf eval --data valid.parquet --level 0.9
    """
    from anime_udf.evaluation import evaluate as run_evaluation

    require_file(data, "--data")
    condition = parse_where(where)
    if report and report.suffix.lower() not in (".html", ".htm"):
        raise click.BadParameter(f"{report}: use an .html file name", param_hint="--report")
    result = run_evaluation(data, condition, model_paths=model_paths, models_dir=models_dir, device=device,
                            precision=precision, level=level, explain=report is not None)
    click.echo(json.dumps(result.json_rows(), indent=2) if as_json else result.screen())
    if as_json and result.skipped:  # on the screen, its last line
        click.echo(result.skipped, err=True)
    if report:
        from anime_udf.report import write_eval_report

        write_eval_report(result, report, catalog=data, where=where)
        click.echo(f"wrote the report to {report}", err=as_json)


@cli.command(name="explain")
@click.option("--data", required=True, type=CATALOG, help="Catalog to explain (CSV, Parquet or FILE.duckdb:TABLE).")
@click.option("--where", "where", help="One SQL expression choosing the rows, e.g. \"anime_id = 5114\".")
@model_option("Bundle(s) to explain")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every row's parts to .parquet or .csv.")
@click.option("--limit", default=20, show_default=True, help="Rows to print (without --out).")
@bundle_options
def explain(data, where, model_paths, out, limit, models_dir, device, precision):
    """Why each selected row scores what it does: the exact Shapley parts of each model's score
    over its input groups (explain_score / explain_score_fusion in SQL).

    One row per (model, catalog row): the row's number in the catalog, its anime_id and title,
    base (the score with every group at its reference: docs/sql.md, "What absent means"), the parts
    synopsis, genres, studio, episodes and, for fusion, lexical, then unclamped = base + parts
    and score = unclamped clamped to [1, 10] (what predict_score returns).

    \b
      anime-udf explain --data catalog.parquet --where "title ILIKE '%mecha%'"
      anime-udf explain --data catalog.parquet --model fusion --out parts.parquet
    """
    from anime_udf.evaluation import explain_rows, format_explanations

    require_file(data, "--data")
    df = explain_rows(data, parse_where(where), model_paths=model_paths, models_dir=models_dir, device=device,
                      precision=precision, out=out)
    click.echo(f"wrote the parts of {df.height} scores to {out}" if out else format_explanations(df, limit))


@cli.command(name="models")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@models_option
def list_models(as_json, models_dir):
    """List the bundles in the models directory: kind, name, which one serves its kind (production:
    promoted with `anime-udf promote`; newest: no bundle of its kind is promoted), created-at, data,
    metrics.

    Every file's checksum is verified: a bundle that would fail to load is listed as broken. A
    production alias naming no usable bundle, or an unreadable aliases file, is said after the
    list, and the exit status is 1."""
    from anime_udf.registry import format_model_list, model_list

    rows, alias_error = model_list(models_dir)
    click.echo(json.dumps(rows, indent=2) if as_json else format_model_list(rows, models_dir))
    if alias_error:
        raise alias_error


@cli.command()
@click.argument("bundle", required=False, metavar="[BUNDLE]")
@click.option("--rollback", "rollback_kind", type=click.Choice(KINDS),
              help="Undo KIND's latest promotion: its production alias goes back to the bundle it named before "
                   "(or is unset, so that the newest serves).")
@models_option
def promote(bundle, rollback_kind, models_dir):
    """Make BUNDLE (a name in the models directory) its kind's production bundle: what SQL, score,
    eval, explain, rescore, dbt and Spark use from then on, unless told otherwise. Or, with
    --rollback KIND, undo KIND's latest promotion.

    The bundle's files are checked against their checksums first (a broken bundle is refused),
    and the alias is changed only if it still names what this command checked: a promotion made
    meanwhile by someone else is never silently undone. Prints the change (old -> new); every
    change is kept in the history in the models directory's aliases.json.

    \b
      anime-udf promote fusion-20261201-020000
      anime-udf promote --rollback fusion
    """
    from anime_udf.promotion import promote as promote_bundle, rollback

    if (bundle is None) == (rollback_kind is None):
        raise click.UsageError("name a BUNDLE to promote, or --rollback KIND")
    click.echo(rollback(rollback_kind, models_dir) if rollback_kind else promote_bundle(bundle, models_dir))


@cli.command()
@click.argument("challenger", metavar="CHALLENGER")
@click.option("--against", default="production", show_default=True, metavar="production|NAME|DIR",
              help="The bundle to compare with: production is what serves the challenger's kind (its production "
                   "bundle, else its newest), or a bundle of the same kind.")
@click.option("--data", required=True, type=CATALOG,
              help="Catalog with a score column (CSV, Parquet or FILE.duckdb:TABLE); the rows either bundle was "
                   "trained on are left out.")
@click.option("--where", "where", help="One SQL expression choosing the catalog rows, as for eval.")
@click.option("--resamples", default=1000, show_default=True, type=click.IntRange(min=100),
              help="Bootstrap resamples for the intervals of the differences.")
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap resamples.")
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=0), help="Largest movers to list.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@bundle_options
def compare(challenger, against, data, where, resamples, seed, top, as_json, models_dir, device, precision):
    """Compare CHALLENGER (a bundle: name or directory) with the bundle it would replace, on the
    catalog rows that neither was trained on (each bundle records its training rows' content
    hashes): how many rows remain, MAE / RMSE / Spearman of both side by side (sql/metrics.sql)
    with 95% paired-bootstrap intervals of the differences (challenger - incumbent), the same on
    the newest years where the catalog has a year column, how many rows move by more than 0.5
    and 1.0, the score distributions and the largest movers with their titles.

    \b
      anime-udf compare fusion-20261201-020000 --data catalog.parquet
      anime-udf compare fusion-20261201-020000 --against fusion-20261101-020000 --data catalog.parquet
    """
    from anime_udf.comparison import compare_bundles, format_comparison

    require_file(data, "--data")
    result = compare_bundles(challenger, data, parse_where(where), against=against, models_dir=models_dir,
                             device=device, precision=precision, resamples=resamples, seed=seed, top=top)
    click.echo(json.dumps(result.to_dict(), indent=2, default=str) if as_json else format_comparison(result, against))


@cli.command(name="rescore", cls=JsonFailures)
@click.option("--catalog", required=True, type=CATALOG,
              help="Catalog to rescore (CSV, Parquet or a DuckDB table as FILE.duckdb:TABLE; with --engine spark, "
                   "a Parquet file, directory or glob), with a key column.")
@click.option("--store", required=True, type=click.Path(path_type=Path),
              help="DuckDB file keeping the scores and the run records (created on the first run), or the "
                   "database of --catalog FILE.duckdb:TABLE (its rescore_* tables beside the others); with "
                   "--engine spark, a directory of Parquet snapshots.")
@click.option("--model", "model_specs", multiple=True, default=("all",), show_default=True,
              metavar="baseline|fusion|all|NAME|DIR",
              help="Model(s) to rescore with: a kind (its production bundle, else its newest), all kinds "
                   "present, or a bundle.")
@click.option("--key", default=DEFAULT_KEY, show_default=True, help="The catalog column that identifies a row.")
@click.option("--level", type=click.FloatRange(0, 1, min_open=True, max_open=True), metavar="LEVEL",
              help="Store each score's prediction interval at this level (0.9: 90 %) as lo and hi beside it; "
                   "rows stored without one, or at another level, are scored again. Without it a run computes "
                   "no interval (rows it does not score keep theirs).")
@click.option("--export", type=click.Path(dir_okay=False, path_type=Path),
              help="After the run, write all current scores to this Parquet file (atomically; DuckDB store).")
@click.option("--dry-run", is_flag=True, help="Say how many rows would be scored; score nothing and leave the store "
                                              "as it is (on Spark, plan files are written beside it and removed).")
@click.option("--allow-shrink", is_flag=True,
              help="Apply a run that removes more than half of the stored keys (refused otherwise).")
@click.option("--wait", type=click.FloatRange(min=0), default=0, show_default=True, metavar="SECONDS",
              help="Wait this long for a concurrent run on the same store, or another process holding the "
                   "store's or the catalog's DuckDB file, to finish, instead of failing.")
@click.option("--json", "as_json", is_flag=True, help="Print the run record as JSON.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a terminal).")
@engine_options
@models_option
@scoring_options
def rescore(catalog, store, model_specs, key, level, export, dry_run, allow_shrink, wait, as_json, progress, engine,
            master, ship, spark_conf, models_dir, device, precision):
    """Incrementally rescore a catalog into a DuckDB store (the nightly job).

    Rows whose inputs and model are unchanged keep their scores; changed and new rows
    are scored; rows gone from the catalog are removed. All store changes of a run are
    one transaction, and each run appends a record to the store's rescore_runs table.

    With --engine spark the rows are hashed and scored on Spark, and the store is a
    directory: each run writes a new Parquet snapshot and publishes it by an atomic
    switch (same hashes, counts and run records as the DuckDB store).

    \b
      anime-udf rescore --catalog catalog.csv --store scores.duckdb --level 0.9 --export scores.parquet
      anime-udf rescore --engine spark --catalog catalog.parquet --store scores/

    \b
    Exit codes, for a scheduler (with --json every failure is also a JSON document on stdout):
      0   done (or a dry run)
      1   the run failed; the store is as it was
      2   a bad option or argument (a missing --catalog file, say); nothing was run
      75  another run holds the store, or another process the catalog's database: try again later
    """
    from anime_udf.rescore import format_summary

    if engine == "spark" and export is not None:
        raise click.BadParameter("a Spark store is Parquet already: read its current snapshot "
                                 "(anime_udf.rescore.on_spark.current_snapshot)", param_hint="--export")
    require_file(catalog, "--catalog", engine)
    if engine == "spark":
        from anime_udf.spark import owned_session
        from anime_udf.rescore.on_spark import rescore_spark

        with owned_session(master, progress=progress if progress is not None else sys.stderr.isatty(),
                           conf=spark_conf) as spark:
            record = rescore_spark(spark, str(catalog), store, models=model_specs, models_dir=models_dir, key=key,
                                   level=level, dry_run=dry_run, wait=wait, allow_shrink=allow_shrink, device=device,
                                   precision=precision, ship=ship)
    else:
        from anime_udf.rescore import rescore as run_rescore

        record = run_rescore(catalog, store, models=model_specs, models_dir=models_dir, key=key, level=level,
                             export=export,
                             dry_run=dry_run, wait=wait, progress=progress, allow_shrink=allow_shrink,
                             device=device, precision=precision)
    click.echo(json.dumps(record.to_dict(), indent=2) if as_json else format_summary(record))


@cli.group(name="cache", invoke_without_command=True)
@click.pass_context
def cache_group(ctx):
    """The embedding cache: how big it is, and removing what is no longer needed.

    Synopsis embeddings are cached by content hash in $ANIME_UDF_CACHE/embeddings.sqlite
    (default ~/.cache/anime-udf), per encoder id (the encoder's checksums, pooling, length
    and precision); an entry takes about 2.3 KB of the file (a 384-d vector is 1.5 KB).

    \b
      anime-udf cache                          size and entries per encoder
      anime-udf cache prune --older-than 90d   entries not written for 90 days
      anime-udf cache prune --encoder sha256:53aa51 --dry-run
      anime-udf cache compact                  rewrite the file (an older cache's layout)
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(cache_info)


@cache_group.command(name="info")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def cache_info(as_json=False):
    """The cache file's size and its entries per encoder id."""
    from anime_udf.cache import cache_summary, format_cache_summary

    summary = cache_summary()
    click.echo(json.dumps(summary, indent=2) if as_json else format_cache_summary(summary))


@cache_group.command(name="prune")
@click.option("--older-than", "older_than", metavar="AGE", callback=parse_age,
              help="Remove entries written longer ago than AGE (30d, 12h, 2w...); entries written before "
                   "anime-udf dated them count as older.")
@click.option("--encoder", metavar="ID",
              help="Remove the entries of the encoder ids starting with ID (as `anime-udf cache` lists them).")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
def cache_prune(older_than, encoder, dry_run):
    """Remove cache entries (both options: entries matching both), then compact the file.

    A removed entry is computed again, and cached again, when a synopsis needs it."""
    from anime_udf.cache import prune_cache

    if older_than is None and not encoder:
        raise click.UsageError("say what to prune: --older-than AGE and/or --encoder ID")
    click.echo(prune_cache(older_than=older_than, encoder=encoder, dry_run=dry_run))


@cache_group.command(name="compact")
def cache_compact():
    """Rewrite the cache file in the current layout, without the space of removed entries.

    A cache created before anime-udf dated its entries keeps every vector in an overflow
    page (about twice the file and 3x slower look-ups) until it is compacted (or pruned)."""
    from anime_udf.cache import compact_cache

    click.echo(compact_cache())
