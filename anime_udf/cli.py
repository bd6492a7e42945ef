"""The anime-udf command line: train · score · eval · explain · sql · models · promote · compare · rescore · cache."""

from __future__ import annotations

import json
import re
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import click

from anime_udf.bundle import KINDS, read_manifest
from anime_udf.columns import DEFAULT_KEY
from anime_udf.devices import DEVICES, PRECISIONS
from anime_udf.errors import EXIT_FAILED, AnimeUdfError
from anime_udf.files import atomic_file
from anime_udf.registry import MODELS_ENV, get_model, list_bundles
from anime_udf.sqlutil import quote_ident

if TYPE_CHECKING:
    import duckdb
    import polars as pl

    from anime_udf.catalog import DatabaseTable

# Each command imports what it needs: torch and transformers only to score or train
# (anime_udf.udf), DuckDB and polars only to query; --help and `models` need neither and
# start in a fraction of a second, and a nightly run with nothing to score skips torch.


def is_user_error(exc: Exception) -> bool:
    """Errors a user can act on from their message alone: ours, missing files, SQL errors."""
    duckdb = sys.modules.get("duckdb")  # a DuckDB error implies DuckDB was imported
    return isinstance(exc, (AnimeUdfError, FileNotFoundError)) or (duckdb is not None and isinstance(exc, duckdb.Error))


class PluginGroup(click.Group):
    """A click group that also offers commands contributed by installed packages
    (entry point group ``anime_udf.commands``), e.g. ``train`` from the training package."""

    def _plugins(self) -> dict:
        return {ep.name: ep for ep in entry_points(group="anime_udf.commands")}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._plugins()))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is None and name in self._plugins():
            command = self._plugins()[name].load()
        return command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            if ctx.params.get("debug") and not is_user_error(exc):
                raise
            raise one_line(exc) from exc


def one_line(exc: Exception) -> click.ClickException:
    """The one place an error becomes what the user reads (``Error: …``) and the exit code."""
    if isinstance(exc, click.ClickException):
        return exc
    if is_user_error(exc):
        failure = click.ClickException(str(exc))
        failure.exit_code = getattr(exc, "exit_code", EXIT_FAILED)
        return failure
    # Anything unforeseen: one line, not a traceback, unless --debug asks for it.
    return click.ClickException(f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)")


class JsonFailures(click.Command):
    """A command whose --json output includes its failures, every one from a bad option to an
    unforeseen error, as {"status": "failed", "error": ..., "exit_code": ...} on stdout (the
    ``Error: …`` line still goes to stderr): a scheduler reads one JSON document either way."""

    def make_context(self, info_name, args, parent=None, **extra):
        asks_json = "--json" in args  # before parsing, which consumes args
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.ClickException as exc:
            if asks_json:
                self.echo_failure(exc)
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if not ctx.params.get("as_json"):
                raise
            failure = one_line(exc)
            self.echo_failure(failure)
            raise failure from exc

    @staticmethod
    def echo_failure(failure: click.ClickException) -> None:
        click.echo(json.dumps({"status": "failed", "error": failure.format_message(),
                               "exit_code": failure.exit_code}, indent=2))


def scoring_options(f):
    """--device and --precision: where and how the text encoder runs."""
    f = click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                     help="The text encoder's precision: auto is bf16 on CUDA GPUs and on CPUs with native "
                          "bf16 (AVX-512 BF16, AMX; 1.6-1.9x faster, scores within 0.02 of fp32), fp32 elsewhere.")(f)
    return click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                        help="Where the text encoder runs: auto is a CUDA GPU when present, else the CPU.")(f)


def models_option(f):
    return click.option(
        "--models", "models_dir", type=click.Path(file_okay=False, path_type=Path), envvar=MODELS_ENV,
        default="models", show_default=True, show_envvar=True, help="Directory of model bundles.",
    )(f)


def spark_settings(ctx, param, values: tuple[str, ...]) -> dict[str, str]:
    """--conf KEY=VALUE (repeatable, as spark-submit's) as {KEY: VALUE}; Spark's engine only."""
    settings = {}
    for value in values:
        key, sep, setting = value.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{value!r}: expected KEY=VALUE, e.g. "
                                     "spark.executorEnv.ANIME_UDF_CACHE=/local-disk/anime-udf")
        settings[key.strip()] = setting
    if settings and ctx.params.get("engine", "duckdb") != "spark":
        raise click.BadParameter("Spark settings need --engine spark", param_hint="--conf")
    return settings


def engine_options(f):
    """--engine, --master, --conf and --ship-bundles: the same command on DuckDB (this process) or on Spark."""
    f = click.option("--conf", "spark_conf", multiple=True, metavar="KEY=VALUE", callback=spark_settings,
                     help="A Spark setting, with --engine spark (repeatable, as spark-submit's --conf), e.g. "
                          "spark.executorEnv.ANIME_UDF_CACHE=/local-disk/anime-udf.")(f)
    f = click.option("--ship-bundles", "ship", is_flag=True,
                     help="With --engine spark: send the bundles to every executor (as zip archives), "
                          "for a cluster whose workers do not see the models directory.")(f)
    f = click.option("--master", default="local[*]", show_default=True, metavar="URL",
                     help="Spark master, with --engine spark (its workers need anime-udf installed: "
                          "see docs/spark.md, \"Running on a cluster\").")(f)
    return click.option("--engine", type=click.Choice(["duckdb", "spark"]), default="duckdb", show_default=True,
                        is_eager=True,  # read before --conf, which needs it
                        help="Run in an in-process DuckDB, or on Apache Spark (pip install 'anime-udf[spark]').")(f)


class CatalogParam(click.ParamType):
    """A catalog option's value: a file, or a table of a DuckDB database as FILE.duckdb:TABLE
    (parsed by anime_udf.catalog.catalog_source, the one parser of that syntax)."""

    name = "catalog"

    def convert(self, value, param, ctx):
        from anime_udf.catalog import CatalogError, catalog_source

        try:
            return catalog_source(value)
        except CatalogError as exc:
            self.fail(str(exc), param, ctx)


CATALOG = CatalogParam()


def require_file(path: Path | DatabaseTable, option: str, engine: str = "duckdb") -> None:
    """The DuckDB engine reads one file or a database table; Spark also takes a directory or a
    glob, but no database table."""
    from anime_udf.catalog import DatabaseTable

    if isinstance(path, DatabaseTable):
        if engine == "spark":
            raise click.BadParameter(f"{path}: a DuckDB table is read with --engine duckdb", param_hint=option)
        path = path.database
    if engine == "duckdb" and not path.is_file():
        raise click.BadParameter(f"{path}: no such file" + (" (a directory or glob needs --engine spark)"
                                                             if path.is_dir() or "*" in str(path) else ""),
                                 param_hint=option)


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


def parse_table(value: str) -> tuple[str, Path | DatabaseTable]:
    from anime_udf.catalog import catalog_source

    name, sep, path = value.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise click.BadParameter(f"{value!r}: expected NAME=FILE, NAME a plain SQL identifier")
    return name, catalog_source(path)


def connect(models_dir: Path, model_paths: tuple[str, ...] = (), device: str = "auto", precision: str = "auto",
            *, require_models: bool = True, database: Path | None = None,
            read_only: bool = True) -> tuple[duckdb.DuckDBPyConnection, dict]:
    """An in-process DuckDB (on ``database``, a DuckDB file, where given) with the scoring
    functions registered (none, where there is no bundle and ``require_models`` is false)."""
    import duckdb

    from anime_udf.catalog import duckdb_path
    from anime_udf.udf import NoModelsError, register

    con = duckdb.connect(duckdb_path(database), read_only=read_only) if database else duckdb.connect()
    try:
        scorers = register(con, models_dir=models_dir, device=device, precision=precision,
                           **chosen_bundles(model_paths, models_dir))
    except NoModelsError:
        if require_models:
            raise
        scorers = {}
    return con, scorers


def run_query(con: duckdb.DuckDBPyConnection, query: str, scorers: dict, models_dir: Path):
    """``con.sql(query)``; a call of a scoring function with no bundle says which bundle is missing."""
    import duckdb

    from anime_udf.registry import no_bundle_message
    from anime_udf.udf import FUNCTION_NAMES

    try:
        return con.sql(query)
    except duckdb.InvalidInputException as exc:
        if "read-only mode" in str(exc):
            raise click.ClickException(f"{exc}; pass --write to change the --db database") from None
        raise
    except duckdb.CatalogException as exc:
        for kind, name in FUNCTION_NAMES.items():
            if name not in scorers and f"name {name} does not exist" in str(exc):
                raise click.ClickException(f"{name}: {no_bundle_message(models_dir, kind)} or --model BUNDLE") from None
        raise


def chosen_bundles(model_paths: tuple[str, ...], models_dir: Path) -> dict[str, Path]:
    """``--model`` names or paths as {kind: bundle}; none: register's default, each kind's
    production bundle, else its newest. Each SQL function serves one bundle: two of a kind are refused."""
    from anime_udf.udf import FUNCTION_NAMES

    chosen: dict[str, Path] = {}
    for name in model_paths:
        path = get_model(name, models_dir)
        kind = read_manifest(path, verify=False)["kind"]
        if kind in chosen and chosen[kind].resolve() != path.resolve():
            raise click.BadParameter(f"two {kind} bundles ({chosen[kind]} and {path}): {FUNCTION_NAMES[kind]} "
                                     "serves one; compare two with `anime-udf compare`", param_hint="--model")
        chosen[kind] = path
    return chosen


def add_catalog(con: duckdb.DuckDBPyConnection, name: str, path: Path | DatabaseTable, **checks) -> int:
    """Read a catalog (validated; ``checks`` as for read_catalog) and expose it to SQL as ``name``."""
    from anime_udf.catalog import read_catalog

    df = read_catalog(path, **checks)
    con.register(name, df)
    return df.height


def check_database(database: Path | None, write: bool) -> None:
    """sql's --db: an existing DuckDB file, or with --write a new one."""
    from anime_udf.catalog import is_duckdb_file

    if write and not database:
        raise click.BadParameter("--write opens the --db database for writing: pass --db FILE.duckdb",
                                 param_hint="--write")
    if database and not write and not database.is_file():
        raise click.BadParameter(f"{database}: no such database file (--write creates one)", param_hint="--db")
    # DuckDB opens some other files (a .csv) as an empty in-memory database and saves nothing.
    if database and database.exists() and not is_duckdb_file(database):
        raise click.BadParameter(f"{database}: not a DuckDB database file", param_hint="--db")


def check_statements(query: str, write: bool) -> None:
    """Refuse, before anything runs, the statements that would break a --db promise. The script
    works in the --db database and writes nothing else: ATTACH and DETACH (through them a script
    can reopen a read-only file for writing, or create another), INSTALL (a download), EXPORT
    DATABASE and COPY ... TO (files that a failed --write script could not take back; a result is
    exported with --out) are refused; without --write, every COPY (COPY ... FROM fills a table);
    with --write, BEGIN / COMMIT / ROLLBACK (the script is one transaction of its own)."""
    import duckdb

    kinds = duckdb.StatementType
    for statement in duckdb.extract_statements(query):
        text = statement.query.strip().rstrip(";")
        first_word = text.split(None, 1)[0].upper() if text else ""
        if write and statement.type == kinds.TRANSACTION:
            reason = "a --write script runs as one transaction, all or nothing; leave out BEGIN, COMMIT and ROLLBACK"
        elif statement.type in (kinds.ATTACH, kinds.DETACH):
            reason = ("sql works in the --db database only: read another database with --table NAME=FILE.duckdb:TABLE"
                      + ("" if write else "; --db is read-only, and attaching could reopen it for writing"))
        elif statement.type == kinds.LOAD and first_word in ("INSTALL", "FORCE"):
            reason = "installing an extension downloads it; sql installs nothing"
        elif statement.type == kinds.EXPORT or (statement.type == kinds.COPY and (not write or copies_to_file(text))):
            reason = ("sql writes files only through --out: export a result with --out FILE" + (
                "" if write else "; --db is read-only (pass --write to fill a table with COPY ... FROM)"))
        else:
            continue
        raise click.BadParameter(f"{text}: {reason}", param_hint="QUERY")


def copies_to_file(copy_statement: str) -> bool:
    """Whether a COPY statement writes a file: a TO outside its parentheses (its query's own words)."""
    import duckdb

    tokens = duckdb.tokenize(copy_statement)
    depth = 0
    for (start, kind), (end, _) in zip(tokens, [*tokens[1:], (len(copy_statement), None)]):
        word = copy_statement[start:end].strip()
        depth += word.count("(") - word.count(")") if kind == duckdb.token_type.operator else 0
        if depth == 0 and kind == duckdb.token_type.keyword and word.upper() == "TO":
            return True
    return False


def check_out_suffix(out: Path) -> str:
    """Checked before any scoring, so a bad name costs nothing."""
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".pq", ".csv"):
        raise click.BadParameter(f"{out}: use a .parquet or .csv file name", param_hint="--out")
    return suffix


def check_score_out(out: Path, data: Path | DatabaseTable) -> str:
    """score's --out, checked before any scoring: a .parquet or .csv file, not a directory and not
    the --data file itself (through a link or not)."""
    if out.is_dir():
        raise click.BadParameter(f"{out}: a directory; name a .parquet or .csv file", param_hint="--out")
    if isinstance(data, Path) and out.exists() and out.samefile(data):
        raise click.BadParameter(f"{out} is the --data file {data}; write the scores to another file",
                                 param_hint="--out")
    return check_out_suffix(out)


def write_result(df: pl.DataFrame, out: Path, before_replace: Callable[[], None] | None = None) -> None:
    """Write a result to .parquet or .csv; readers never see a half-written file. ``before_replace``
    runs once the file is written, before it takes its name (sql --write commits there: the
    result is saved with the changes, or neither is)."""
    suffix = check_out_suffix(out)
    with atomic_file(out) as tmp:
        if suffix == ".csv":
            df.write_csv(tmp)
        else:
            df.write_parquet(tmp)
        if before_replace is not None:
            before_replace()


@cli.command()
@click.argument("query")
@click.option("--db", "database", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.duckdb",
              help="Run the query in this DuckDB database: its tables are the query's (read-only unless --write: "
                   "ATTACH and DETACH are refused).")
@click.option("--write", is_flag=True, help="Open --db for writing (created if missing): CREATE, INSERT, UPDATE... "
                                            "The query runs as one transaction: all of it is saved, or nothing.")
@click.option("--table", "tables", multiple=True, metavar="NAME=FILE",
              help="Expose a catalog (CSV, Parquet or FILE.duckdb:TABLE) to the query as a view NAME (repeatable).")
@click.option("--model", "model_paths", multiple=True, metavar="NAME|DIR",
              help="Bundle to register, one per kind (default: each kind's production bundle, else its newest).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the result to .parquet or .csv.")
@click.option("--limit", default=50, show_default=True, help="Rows to print (without --out).")
@models_option
@scoring_options
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
    import polars as pl

    from anime_udf.evaluation import load_report_macros

    views = [parse_table(spec) for spec in tables]
    names = [name.casefold() for name, _ in views]  # SQL identifiers are case-insensitive
    if len(set(names)) < len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise click.BadParameter(f"view name(s) given more than once: {', '.join(repeated)}", param_hint="--table")
    if out:
        check_out_suffix(out)
    check_database(database, write)
    if database:
        check_statements(query, write)
    from anime_udf.catalog import read_catalog_as_read

    # Read before the --db database is opened: a --table of that database reads it through a
    # read-only connection of its own, which DuckDB refuses beside a --write one. The views are
    # the catalogs as read (checked, never rewritten): a query's result holds the user's values.
    frames = [(name, read_catalog_as_read(path)[0]) for name, path in views]
    con, scorers = connect(models_dir, model_paths, device, precision, require_models=False, database=database,
                           read_only=not write)
    with con:  # closed at the end: a --db database is free for the next process (or the next command)
        load_report_macros(con)
        for name, df in frames:
            con.register(name, df)
        if write:  # one transaction: committed once the whole script has run, else rolled back on close
            con.begin()
        result = run_query(con, query, scorers, models_dir)
        df = result.pl() if result is not None else None  # a last SELECT runs here, inside the transaction
        commit = con.commit if write else None
        if out and df is not None:
            write_result(df, out, before_replace=commit)  # nothing is saved when --out cannot be written
        elif commit:
            commit()
    if df is None:
        return
    if out:
        click.echo(f"wrote {df.height} rows to {out}")
    else:
        with pl.Config(tbl_rows=limit, fmt_str_lengths=40, tbl_width_chars=160):
            click.echo(df.head(limit))


@cli.command()
@click.option("--data", required=True, type=CATALOG,
              help="Catalog to score: CSV, Parquet or a DuckDB table as FILE.duckdb:TABLE (with --engine spark, "
                   "a Parquet file, directory or glob).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output .parquet or .csv, not the --data file: the catalog plus one score column per model "
                   "(with --engine spark, a directory of Parquet files). A column the catalog already has under "
                   "the name of a function scored (a scored file scored again) is replaced by this run's scores.")
@click.option("--model", "model_paths", multiple=True, metavar="NAME|DIR",
              help="Bundle(s) to score with, one per kind (default: each kind's production bundle, else its newest).")
@engine_options
@models_option
@scoring_options
def score(data, out, model_paths, engine, master, ship, spark_conf, models_dir, device, precision):
    """Score a whole catalog file with every registered model.

    \b
      anime-udf score --data catalog.parquet --out scored.parquet
      anime-udf score --data warehouse.duckdb:anime --out scored.parquet
      anime-udf score --engine spark --data 'catalog/*.parquet' --out scored/
    """
    require_file(data, "--data", engine)
    if engine == "spark":
        from anime_udf.spark import owned_session, score_parquet

        with owned_session(master, progress=True, conf=spark_conf) as spark:
            scored = score_parquet(spark, str(data), out, models_dir=models_dir, device=device, precision=precision,
                                   ship=ship, **chosen_bundles(model_paths, models_dir))
        click.echo(scored.summary(out, " on Spark"))
        return
    from anime_udf.udf import score_file

    check_score_out(out, data)
    con, scorers = connect(models_dir, model_paths, device, precision)
    click.echo(score_file(con, list(scorers), data, out).summary(out))


def parse_where(where: str) -> str:
    """``--where`` as exactly one SQL expression (anime_udf.sqlutil.one_expression)."""
    from anime_udf.sqlutil import NotOneExpressionError, one_expression

    try:
        return one_expression(where)
    except NotOneExpressionError as exc:
        raise click.BadParameter(str(exc), param_hint="--where") from None


@cli.command(name="eval")
@click.option("--data", required=True, type=CATALOG,
              help="Catalog with a score column (CSV, Parquet or FILE.duckdb:TABLE); rows with a NULL score are "
                   "skipped and counted.")
@click.option("--model", "model_paths", multiple=True, metavar="NAME|DIR",
              help="Bundle(s) to evaluate, one per kind (default: each kind's production bundle, else its newest, "
                   "side by side).")
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
@models_option
@scoring_options
def evaluate(data, model_paths, where, as_json, level, report, models_dir, device, precision):
    """n, MAE, RMSE, Spearman and R² of each model, computed in SQL (sql/metrics.sql), beside the
    reference of predicting the training mean (what a model must beat); with --level, the
    coverage, mean width and interval score of its prediction intervals.

    \b
    anime-udf eval --data valid.parquet --where "anime_id % 5 = 0" --report report.html
    anime-udf eval --data valid.parquet --level 0.9
    """
    import polars as pl

    from anime_udf.evaluation import (CONSTANT_WIDTH, EVALUATED, INTERVALS, REFERENCE, build_intervals,
                                      build_predictions, build_report_intervals)
    from anime_udf.metrics import interval_metrics_table, metrics_table

    require_file(data, "--data")
    condition = parse_where(where) if where else "true"
    if report and report.suffix.lower() not in (".html", ".htm"):
        raise click.BadParameter(f"{report}: use an .html file name", param_hint="--report")
    con, scorers = connect(models_dir, model_paths, device, precision)
    add_catalog(con, "catalog", data, require_score=True, allow_missing_scores=True)
    con.execute("SET enable_external_access = false")  # --where filters the catalog; it reads no files
    evaluation = build_predictions(con, "catalog", condition, scorers, explain=report is not None)
    table = metrics_table(con, EVALUATED)
    intervals, built = None, []
    if level is not None:
        built = build_intervals(con, scorers, [level])
        intervals = interval_metrics_table(con, INTERVALS, level)
    skipped = f"skipped {evaluation.skipped_rows} selected row(s) without a score" if evaluation.skipped_rows else ""
    if as_json:
        rows = table.filter(pl.col("model").is_in(evaluation.models)).to_dicts()
        if intervals is not None:  # each model's interval figures beside its metrics
            by_model = {row.pop("model"): row for row in intervals.to_dicts()}
            for row in rows:
                row["interval"] = {"level": level, **{k: v for k, v in by_model[row["model"]].items() if k != "n"},
                                   CONSTANT_WIDTH.replace(" ", "_"): {
                                       k: v for k, v in by_model[f"{row['model']} {CONSTANT_WIDTH}"].items()
                                       if k != "n"}}
        click.echo(json.dumps(rows, indent=2))
        if skipped:
            click.echo(skipped, err=True)
    else:
        def shown(value) -> str:  # an undefined figure (the training mean's Spearman) as a dash
            return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

        with pl.Config(tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
            click.echo(pl.DataFrame({c: [shown(v) for v in table[c]] for c in table.columns}))
            if intervals is not None:
                click.echo(f"prediction intervals at level {level:g}:")
                click.echo(pl.DataFrame({c: [shown(v) for v in intervals[c]] for c in intervals.columns}))
        means = ", ".join(f"{mean:.4f}" for mean in evaluation.references.values())
        click.echo(f"{REFERENCE}: every row predicted as the mean score of the training data ({means})")
        if intervals is not None:
            click.echo(f"{CONSTANT_WIDTH}: the model's score ± the one width that covers {level:g} of its "
                       "calibration rows (the adaptive interval must beat it)")
        if skipped:
            click.echo(skipped)
    if report:
        from anime_udf.report import write_report

        write_report(con, evaluation, report, catalog=data, where=where,
                     intervals=build_report_intervals(con, scorers, level, built))
        click.echo(f"wrote the report to {report}", err=as_json)


@cli.command(name="explain")
@click.option("--data", required=True, type=CATALOG, help="Catalog to explain (CSV, Parquet or FILE.duckdb:TABLE).")
@click.option("--where", "where", help="One SQL expression choosing the rows, e.g. \"anime_id = 5114\".")
@click.option("--model", "model_paths", multiple=True, metavar="NAME|DIR",
              help="Bundle(s) to explain, one per kind (default: each kind's production bundle, else its newest).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every row's parts to .parquet or .csv.")
@click.option("--limit", default=20, show_default=True, help="Rows to print (without --out).")
@models_option
@scoring_options
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
    import polars as pl

    from anime_udf.evaluation import explanations_sql

    require_file(data, "--data")
    condition = parse_where(where) if where else "true"
    if out:
        check_out_suffix(out)
    con, scorers = connect(models_dir, model_paths, device, precision)
    add_catalog(con, "catalog", data)
    con.execute("SET enable_external_access = false")  # --where filters the catalog; it reads no files
    columns = [row[0] for row in con.execute("DESCRIBE catalog").fetchall()]
    keep = [quote_ident(c) for c in ("row", DEFAULT_KEY, "title") if c == "row" or c in columns]
    con.execute("CREATE TEMP TABLE selected AS SELECT * FROM "
                f"(SELECT row_number() OVER () AS \"row\", * FROM catalog) WHERE {condition}")
    df = con.sql(f"SELECT * FROM ({explanations_sql(scorers, 'selected', keep)}) ORDER BY \"row\", model").pl()
    if df.is_empty():
        raise click.ClickException("nothing to explain: the selection holds no catalog row (check --where)")
    if out:
        write_result(df, out)
        click.echo(f"wrote the parts of {df.height} scores to {out}")
        return
    with pl.Config(tbl_rows=limit, tbl_cols=-1, float_precision=3, fmt_str_lengths=30, tbl_width_chars=250,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        click.echo(df.head(limit))
    click.echo("base + parts = unclamped; score = unclamped clamped to [1, 10]"
               + (f"; {limit} of {df.height} rows shown (--limit, --out)" if df.height > limit else ""))


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
    from anime_udf.registry import decisions, read_aliases, serving_each_kind

    def field(manifest: dict, *keys: str):
        """A nested value, or None where a level is missing or not an object (hand-edited manifests)."""
        for key in keys:
            manifest = manifest.get(key) if isinstance(manifest, dict) else None
        return manifest

    alias_error = None
    try:
        serving = {s.path.name: s.via for s in serving_each_kind(models_dir)}  # production or newest
        decided = decisions(read_aliases(models_dir))
    except AnimeUdfError as exc:  # the list is still worth showing
        serving, decided, alias_error = {}, {}, exc
    rows = []
    for b in list_bundles(models_dir, verify=True):
        m = b.manifest or {}
        figures = {f"valid_{k}": field(m, "metrics", "valid", k) for k in ("mae", "rmse", "spearman")}
        rows.append({
            "kind": b.kind, "name": b.path.name, "serves": serving.get(b.path.name), "created_at": b.created_at,
            "data": str(field(m, "training", "data_fingerprint") or ""),
            **{k: v if isinstance(v, (int, float)) and not isinstance(v, bool) else None for k, v in figures.items()},
            "error": b.error,
            "decision": {k: v for k, v in decided[(b.kind, b.path.name)].items()
                         if k in ("at", "promoted", "incumbent", "comparison", "refused")}
            if (b.kind, b.path.name) in decided else None,
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo(f"no bundles in {models_dir}; train one with `anime-udf train baseline --data CATALOG`")
    for r in [] if as_json else rows:
        if r["error"]:
            click.echo(f"{'broken':9} {r['name']:32} {r['error']}")
            continue
        figures = " ".join(f"{k[6:]}={r[k]:.3f}" for k in ("valid_mae", "valid_rmse", "valid_spearman")
                           if r[k] is not None)
        click.echo(f"{r['kind']:9} {r['name']:32} {r['serves'] or '':10} {r['created_at']:26} {r['data']:24} "
                   f"{figures}")
        if r["decision"]:
            click.echo(f"{'':9} {describe_decision(r['decision'])}")
    if alias_error:
        raise alias_error


def describe_decision(decision: dict) -> str:
    """One line for ``models``: what ``train --promote-if-better`` decided about a bundle, and on what."""
    verdict = "promoted" if decision.get("promoted") else "not promoted"
    head = f"--promote-if-better ({decision.get('at', '?')}): {verdict}"
    c = decision.get("comparison")
    try:
        return (f"{head} against {decision['incumbent']}: {c['metric']} {c['challenger']:.4f} against "
                f"{c['incumbent']:.4f}, difference {c['difference']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}] on "
                f"{c['rows']} rows")
    except (KeyError, TypeError, ValueError):  # a refusal with no figures, or a history edited by hand
        return f"{head}: {decision.get('refused') or json.dumps(c)}"


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
    from anime_udf.registry import (ALIASES_FILE, PRODUCTION, AliasError, aliased_bundle, newest, read_aliases,
                                    resolve_models_dir, rollback_entry, set_production)
    from anime_udf.text import text_encoder_dirs

    if (bundle is None) == (rollback_kind is None):
        raise click.UsageError("name a BUNDLE to promote, or --rollback KIND")
    aliases = read_aliases(models_dir)
    if rollback_kind:
        kind = rollback_kind
        undone = rollback_entry(aliases, kind)
        if undone is None:
            raise AliasError(f"no promotion of {kind} to roll back in {resolve_models_dir(models_dir) / ALIASES_FILE}")
        target = undone["from"]
        path = aliased_bundle(kind, target, models_dir) if target else None
    else:
        path = get_model(bundle, models_dir)
        root = resolve_models_dir(models_dir)
        if path.resolve().parent != root.resolve():
            raise click.BadParameter(f"{path} is not in the models directory {root}; copy it there first",
                                     param_hint="BUNDLE")
        kind, target = read_manifest(path, verify=False)["kind"], path.name
    old = aliases.production.get(kind)
    if path is not None:
        text_encoder_dirs(path, read_manifest(path))  # every file's checksum, and the encoder it needs
    if old == target:
        click.echo(f"{kind} {PRODUCTION}: {target} (unchanged)")
        return
    set_production(kind, target, old, "rollback" if rollback_kind else "promote", models_dir)
    unset = f"unset (the newest serves: {getattr(newest(kind, models_dir), 'name', 'none')})"
    click.echo(f"{kind} {PRODUCTION}: {old or unset} -> {target or unset}")


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
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=0),
              help="Largest movers to list.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@models_option
@scoring_options
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
    import duckdb

    from anime_udf.comparison import compare as run_comparison
    from anime_udf.registry import resolve
    from anime_udf.udf import LazyScorer

    require_file(data, "--data")
    condition = parse_where(where) if where else "true"
    challenger_path = get_model(challenger, models_dir)
    kind = read_manifest(challenger_path, verify=False)["kind"]
    incumbent_path = resolve(kind, models_dir) if against == "production" else get_model(against, models_dir)
    if incumbent_path is None:
        raise click.BadParameter(f"no {kind} bundle serves in {models_dir} to compare with; name one",
                                 param_hint="--against")
    if read_manifest(incumbent_path, verify=False)["kind"] != kind:
        raise click.BadParameter(f"{incumbent_path} is not a {kind} bundle, as {challenger_path} is",
                                 param_hint="--against")
    if incumbent_path.resolve() == challenger_path.resolve():
        raise click.BadParameter(f"{challenger_path.name} is the bundle it would be compared with", param_hint="--against")
    scorers = {role: LazyScorer(path, device, precision) for role, path in
               (("challenger", challenger_path), ("incumbent", incumbent_path))}
    con = duckdb.connect()
    add_catalog(con, "catalog", data, require_score=True, allow_missing_scores=True)
    con.execute("SET enable_external_access = false")  # --where filters the catalog; it reads no files
    result = run_comparison(con, "catalog", condition, scorers, resamples=resamples, seed=seed, top=top)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    click.echo(format_comparison(result, against))


def format_comparison(result, against: str) -> str:
    """compare's screen: counts, figures side by side with the intervals, moves, distributions, movers."""
    from anime_udf.comparison import wins

    names = result.bundles
    incumbent = f"{names['incumbent']}" + (" (production)" if against == "production" else "")
    either = result.selected_rows - result.compared_rows
    lines = [f"challenger {names['challenger']} against {incumbent}",
             f"rows: {result.selected_rows} selected; trained on by the challenger {result.trained_rows['challenger']}, "
             f"by the incumbent {result.trained_rows['incumbent']}, by either {either}; compared on the "
             f"{result.compared_rows} left ({result.scored_rows} with a score)"]

    def table(title: str, metrics: dict, intervals: dict) -> None:
        percent = f"{result.level:.0%}"
        lines.extend(["", f"{title:12} {'challenger':>11} {'incumbent':>11} {'difference':>11}  "
                          f"{percent} interval ({result.resamples} paired resamples)",
                      f"{'n':12} {metrics['challenger']['n']:>11} {metrics['incumbent']['n']:>11}"])
        for m in ("mae", "rmse", "spearman"):
            i = intervals[m]
            lines.append(f"{m:12} {metrics['challenger'][m]:>11.4f} {metrics['incumbent'][m]:>11.4f} "
                         f"{i['difference']:>+11.4f}  [{i['lo']:+.4f}, {i['hi']:+.4f}]"
                         + ("  challenger better" if wins(m, i) else ""))

    table("all rows", result.metrics, result.intervals)
    if result.newest:
        table(result.newest["years"], result.newest["metrics"], result.newest["intervals"])
    n = result.compared_rows
    lines.extend(["", "moved: " + "; ".join(f"by more than {t}: {k} of {n} rows ({k / n:.1%})"
                                             for t, k in result.moved.items()),
                  f"scores {'mean':>8} {'std':>7} {'p10':>7} {'p50':>7} {'p90':>7}"])
    for role, d in result.distribution.items():
        lines.append(f"{role[:10]:10}" + "".join(f" {d[k]:>7.3f}" for k in ("mean", "std", "p10", "p50", "p90")))
    if result.movers:
        lines.extend(["", f"largest movers {'key':>10}  {'title':40} {'score':>6} {'incumbent':>9} "
                          f"{'challenger':>10} {'change':>7}"])
        for r in result.movers:
            score = "" if r["score"] is None else f"{r['score']:.2f}"
            lines.append(f"{'':14} {r['key']:>10}  {(r['title'] or '')[:40]:40} {score:>6} {r['incumbent']:>9.3f} "
                         f"{r['challenger']:>10.3f} {r['change']:>+7.3f}")
    return "\n".join(lines)


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


# --- the embedding cache ------------------------------------------------------------------------

AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(value: str) -> float:
    """'30d', '12h', '90m', '2w', '45s' -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value or "")
    if not match:
        raise click.BadParameter(f"{value!r} is not an age such as 30d, 12h, 90m, 2w or 45s", param_hint="--older-than")
    return float(match.group(1)) * AGE_UNITS[match.group(2)]


def open_cache():
    """The embedding cache the scoring commands use ($ANIME_UDF_CACHE); an unusable one is an error here."""
    import warnings

    from anime_udf.cache import EmbeddingCache

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the error says it
        cache = EmbeddingCache()
    cache.require_usable()
    return cache


def _when(seconds: float | None) -> str:
    import datetime as dt

    return "-" if seconds is None else dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M")


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
    cache = open_cache()
    encoders = cache.stats()
    if as_json:
        click.echo(json.dumps({"path": str(cache.path), "bytes": cache.size_bytes(), "encoders": encoders}, indent=2))
        return
    total = sum(e["entries"] for e in encoders)
    click.echo(f"{cache.path}: {cache.size_bytes() / 1e6:,.1f} MB, {total:,} entries, {len(encoders)} encoder(s)")
    for e in encoders:
        undated = f", {e['undated']:,} undated" if e["undated"] else ""
        click.echo(f"  {e['entries']:>10,} entries {e['vector_bytes'] / 1e6:>9,.1f} MB  written "
                   f"{_when(e['oldest'])} .. {_when(e['newest'])}{undated}  {e['encoder']}")


@cache_group.command(name="prune")
@click.option("--older-than", "older_than", metavar="AGE",
              help="Remove entries written longer ago than AGE (30d, 12h, 2w...); entries written before "
                   "anime-udf dated them count as older.")
@click.option("--encoder", metavar="ID",
              help="Remove the entries of the encoder ids starting with ID (as `anime-udf cache` lists them).")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
def cache_prune(older_than, encoder, dry_run):
    """Remove cache entries (both options: entries matching both), then compact the file.

    A removed entry is computed again, and cached again, when a synopsis needs it."""
    age = parse_age(older_than) if older_than is not None else None
    if age is None and not encoder:
        raise click.UsageError("say what to prune: --older-than AGE and/or --encoder ID")
    cache = open_cache()
    before = cache.size_bytes()
    removed = cache.prune(older_than=age, encoder=encoder or None, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {sum(removed.values()):,} entries" + (":" if removed else ""))
    for enc, n in sorted(removed.items(), key=lambda item: -item[1]):
        click.echo(f"  {n:>10,}  {enc}")
    if not dry_run:
        click.echo(f"{cache.path}: {before / 1e6:,.1f} MB -> {cache.size_bytes() / 1e6:,.1f} MB")


@cache_group.command(name="compact")
def cache_compact():
    """Rewrite the cache file in the current layout, without the space of removed entries.

    A cache created before anime-udf dated its entries keeps every vector in an overflow
    page (about twice the file and 3x slower look-ups) until it is compacted (or pruned)."""
    cache = open_cache()
    before = cache.size_bytes()
    cache.compact()
    click.echo(f"{cache.path}: {before / 1e6:,.1f} MB -> {cache.size_bytes() / 1e6:,.1f} MB")
