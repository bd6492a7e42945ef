"""What the commands of cli.py share: the click classes through which every error reaches the
user as one line, the options several commands take, and the parsing of option values."""

from __future__ import annotations

import json
import re
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

import click

from anime_udf.devices import DEVICES, PRECISIONS
from anime_udf.errors import EXIT_FAILED, AnimeUdfError, OptionError
from anime_udf.registry import MODELS_ENV

if TYPE_CHECKING:
    from anime_udf.catalog import DatabaseTable


def is_user_error(exc: Exception) -> bool:
    """Errors a user can act on from their message alone: ours, missing files, SQL errors."""
    duckdb = sys.modules.get("duckdb")  # a DuckDB error implies DuckDB was imported
    return isinstance(exc, (AnimeUdfError, FileNotFoundError)) or (duckdb is not None and isinstance(exc, duckdb.Error))


def one_line(exc: Exception, ctx: click.Context | None = None) -> click.ClickException:
    """The one place an error becomes what the user reads (``Error: …``) and the exit code; the
    library's OptionError reads as click's own bad option, under the usage of ``ctx``'s command."""
    if isinstance(exc, click.ClickException):
        return exc
    if isinstance(exc, OptionError):
        return click.BadParameter(str(exc), ctx, param_hint=exc.option)
    if is_user_error(exc):
        failure = click.ClickException(str(exc))
        failure.exit_code = getattr(exc, "exit_code", EXIT_FAILED)
        return failure
    # Anything unforeseen: one line, not a traceback, unless --debug asks for it.
    return click.ClickException(f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)")


class Command(click.Command):
    """This CLI's commands: an OptionError turns into click's error here, where the command's
    context is still there to show its usage; every other error, in PluginGroup.invoke."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OptionError as exc:
            raise one_line(exc, ctx) from exc


class PluginGroup(click.Group):
    """A click group that also offers commands contributed by installed packages
    (entry point group ``anime_udf.commands``), e.g. ``train`` from the training package."""

    command_class = Command

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


class JsonFailures(Command):
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


def model_option(what: str, default_also: str = ""):
    """--model NAME|DIR (repeatable): the bundles a command uses, one per kind (udf.chosen_bundles)."""
    return click.option("--model", "model_paths", multiple=True, metavar="NAME|DIR",
                        help=f"{what}, one per kind (default: each kind's production bundle, else its "
                             f"newest{default_also}).")


def models_option(f):
    return click.option(
        "--models", "models_dir", type=click.Path(file_okay=False, path_type=Path), envvar=MODELS_ENV,
        default="models", show_default=True, show_envvar=True, help="Directory of model bundles.",
    )(f)


def bundle_options(f):
    """--models, --device and --precision: where the bundles are, and where and how their text encoder runs."""
    return models_option(scoring_options(f))


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
                          "see docs/spark.md, \"Running on a cluster\"). A local[...] master's JVM gets 4 GB "
                          "of heap unless --conf spark.driver.memory=... says otherwise.")(f)
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


def parse_table(value: str) -> tuple[str, Path | DatabaseTable]:
    from anime_udf.catalog import catalog_source

    name, sep, path = value.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise click.BadParameter(f"{value!r}: expected NAME=FILE, NAME a plain SQL identifier")
    return name, catalog_source(path)


def parse_tables(values: tuple[str, ...]) -> list[tuple[str, Path | DatabaseTable]]:
    """sql's --table options, each view named once (SQL identifiers are case-insensitive)."""
    views = [parse_table(value) for value in values]
    names = [name.casefold() for name, _ in views]
    if len(set(names)) < len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise click.BadParameter(f"view name(s) given more than once: {', '.join(repeated)}", param_hint="--table")
    return views


def parse_where(where: str | None) -> str:
    """``--where`` as exactly one SQL expression (anime_udf.sqlutil.one_expression); none: every row."""
    from anime_udf.sqlutil import NotOneExpressionError, one_expression

    if not where:
        return "true"
    try:
        return one_expression(where)
    except NotOneExpressionError as exc:
        raise click.BadParameter(str(exc), param_hint="--where") from None


AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(ctx, param, value: str | None) -> float | None:
    """--older-than: '30d', '12h', '90m', '2w', '45s' -> seconds."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value)
    if not match:
        raise click.BadParameter(f"{value!r} is not an age such as 30d, 12h, 90m, 2w or 45s", param_hint="--older-than")
    return float(match.group(1)) * AGE_UNITS[match.group(2)]
