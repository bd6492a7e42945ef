"""anime-udf: score an anime catalog with deep-learning models from DuckDB SQL.

The public names load on first use (PEP 562): ``import anime_udf`` stays light, and
torch is imported only by what scores or trains."""

from importlib import import_module

_PUBLIC = {
    "BundleError": "anime_udf.bundle",
    "CatalogError": "anime_udf.catalog",
    "UnknownModelError": "anime_udf.registry",
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
