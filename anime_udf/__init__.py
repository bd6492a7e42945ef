"""anime-udf: score an anime catalog with deep-learning models from DuckDB SQL.

The public names load on first use (PEP 562): ``import anime_udf`` stays light, and
torch is imported only by what scores or trains."""

from importlib import import_module

_PUBLIC = {
    # Every error a caller may catch: the base of them all, and each of the package's own
    # (tests/test_project.py checks that none is missing). Spark's and dbt's live with their extras.
    "AliasError": "anime_udf.registry",
    "AnimeUdfError": "anime_udf.errors",
    "BundleError": "anime_udf.bundle",
    "CacheError": "anime_udf.cache",
    "CatalogError": "anime_udf.catalog",
    "ComparisonError": "anime_udf.comparison",
    "DeviceError": "anime_udf.devices",
    "EncoderError": "anime_udf.text",
    "LevelError": "anime_udf.intervals",
    "NoCalibrationError": "anime_udf.intervals",
    "NoModelsError": "anime_udf.udf",
    "NotOneExpressionError": "anime_udf.sqlutil",
    "NothingToEvaluateError": "anime_udf.evaluation",
    "OptionError": "anime_udf.errors",
    "OutputError": "anime_udf.files",
    "RescoreError": "anime_udf.rescore.run",
    "StoreBusyError": "anime_udf.rescore.run",
    "UnknownModelError": "anime_udf.registry",
    "WarehouseError": "anime_udf.warehouse",
    "get_model": "anime_udf.registry",
    "load_scorer": "anime_udf.scoring",
    "read_catalog": "anime_udf.catalog",
    "register": "anime_udf.udf",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'anime_udf' has no attribute {name!r}")
