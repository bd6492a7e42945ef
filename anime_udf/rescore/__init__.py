"""Nightly batch rescoring: incremental, crash-safe, and recorded, on DuckDB or on Spark.

A store keeps one score per (catalog key, model id) with the hash of the inputs it was
computed from; a run scores only the rows whose inputs changed or that the model never
scored, and records what it did. Both engines run the same SQL, sql/rescore.sql:

- ``sql``: the SQL layer, its sections, the run's variables and the shared queries;
- ``bundles``: which bundles a run scores, and their model ids;
- ``store``: the lock both engines take, and the DuckDB store (attach, plan read-only);
- ``record``: the run record and its one-screen summary;
- ``run``: a run's id and clock, its errors, the test hook;
- ``on_duckdb``: ``rescore(catalog, store)``, a DuckDB file as the store;
- ``on_spark``: ``rescore_spark(spark, catalog, store)``, a directory of Parquet snapshots
  (imports pyspark: not imported here).
"""

from anime_udf.rescore.bundles import model_id
from anime_udf.rescore.on_duckdb import rescore
from anime_udf.rescore.record import RunRecord, format_summary
from anime_udf.rescore.run import RescoreError, StoreBusyError
from anime_udf.rescore.sql import sql_sections

__all__ = ["RescoreError", "RunRecord", "StoreBusyError", "format_summary", "model_id", "rescore", "sql_sections"]
