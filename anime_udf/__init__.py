"""anime-udf: score an anime catalog with deep-learning models from DuckDB SQL."""

from anime_udf.bundle import BundleError
from anime_udf.catalog import CatalogError, read_catalog
from anime_udf.registry import UnknownModelError, get_model
from anime_udf.scoring import load_scorer
from anime_udf.udf import register

__all__ = [
    "BundleError",
    "CatalogError",
    "UnknownModelError",
    "get_model",
    "load_scorer",
    "read_catalog",
    "register",
]
__version__ = "0.1.0"
