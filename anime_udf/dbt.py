"""The dbt-duckdb plugin: predict_score / predict_score_fusion (with explain_score / explain_score_fusion
and predict_score_interval / predict_score_fusion_interval) and the project's SQL macros in dbt models.

In ``profiles.yml`` (``pip install 'anime-udf[dbt]'``)::

    my_project:
      outputs:
        dev:
          type: duckdb
          path: warehouse.duckdb
          plugins:
            - module: anime_udf.dbt
              config:
                models: models          # the models directory, as --models DIR (default: $ANIME_UDF_MODELS, else ./models)
                # baseline: models/baseline-...   fusion: models/fusion-...   (explicit bundles instead)
                # device: auto          precision: auto   (as for anime_udf.register)

A model then says ``select anime_id, predict_score_fusion(synopsis, genres, studio, episodes)
as score from {{ ref('anime') }}``. Beside the two functions every dbt connection has the
input-hash macros of sql/rescore.sql (``rescore_input_hash(synopsis, genres, studio, episodes)``,
what an incremental model compares to find new and changed rows), ``anime_udf_model_ids()``
(the ids of the registered bundles, as ``anime-udf rescore`` computes them: a retrained
bundle has a new one, so an incremental model can rescore its rows) and the metric macros
of sql/metrics.sql (``mae``, ``rmse``, ``r2``, ``regression_metrics``).

Registering checks the bundles and imports neither torch nor transformers: a model that
scores nothing, or a ``dbt test``, never loads them. A mistake there (an unknown setting, no
bundles in the models directory, a broken bundle) stops dbt with one line naming it. Relative
paths are relative to the directory dbt runs in.
"""

from __future__ import annotations

from typing import Any

from dbt.adapters.duckdb.plugins import BasePlugin
from dbt_common.exceptions import DbtRuntimeError
from duckdb import DuckDBPyConnection

from anime_udf.errors import AnimeUdfError
from anime_udf.metrics import metric_macros
from anime_udf.rescore import model_id, sql_sections
from anime_udf.sqlutil import quote_literal
from anime_udf.udf import LazyScorer, register_bundles, register_functions

SETTINGS = ("models", "baseline", "fusion", "device", "precision")


class PluginError(AnimeUdfError, DbtRuntimeError):
    """A mistake in the plugin's settings or bundles. A dbt error, because dbt prints those as
    their message; any other exception it prints with its (chained, 270-line) traceback."""

    def __str__(self) -> str:
        return self.msg  # the message alone: dbt puts its own header above it ("Database Error")


class Plugin(BasePlugin):
    def initialize(self, plugin_config: dict[str, Any]) -> None:
        try:
            self.set_up(plugin_config)
        except AnimeUdfError as exc:  # no models directory, a broken bundle, a bad device, ...
            raise PluginError(f"anime_udf.dbt: {exc}") from None

    def set_up(self, plugin_config: dict[str, Any]) -> None:
        # dbt-duckdb merges the profile's DuckDB `settings` into every plugin's config:
        # only a key that is neither ours nor one of those is a mistake (a typo, say).
        duckdb_settings = set((self.creds.settings or {}) if self.creds is not None else {})
        unknown = sorted(set(plugin_config) - set(SETTINGS) - duckdb_settings)
        if unknown:
            raise AnimeUdfError(f"unknown setting(s) {', '.join(unknown)}; its settings are {', '.join(SETTINGS)}")
        config = {k: plugin_config.get(k) for k in SETTINGS}
        # One scorer per bundle for the whole dbt invocation: dbt-duckdb may close and reopen
        # its connection between steps, and each model loads once (its functions are registered
        # on every connection, configure_connection).
        device, precision = config["device"] or "auto", config["precision"] or "auto"
        self.scorers = list(register_bundles(config["baseline"], config["fusion"], config["models"],
                                             lambda path, manifest: LazyScorer(path, device, precision,
                                                                               manifest)).values())
        model_ids = ",".join(model_id(scorer.path, scorer.manifest) for scorer in self.scorers)
        self.macros = (sql_sections()["macros"]
                       + f"CREATE OR REPLACE TEMP MACRO anime_udf_model_ids() AS {quote_literal(model_ids)};\n"
                       + metric_macros())

    def configure_connection(self, conn: DuckDBPyConnection) -> None:
        for scorer in self.scorers:  # functions belong to the database: every cursor sees them
            register_functions(conn, scorer)

    def configure_cursor(self, cursor: DuckDBPyConnection) -> None:
        # Macros are TEMP, so per connection: each cursor dbt opens needs its own.
        cursor.execute(self.macros)
