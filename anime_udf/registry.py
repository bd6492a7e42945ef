"""The models directory: listing bundles and resolving a model by name or path."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anime_udf.errors import AnimeUdfError
from anime_udf.bundle import KINDS, BundleError, read_manifest, recover_replaced

MODELS_ENV = "ANIME_UDF_MODELS"


class UnknownModelError(AnimeUdfError, LookupError):
    """No bundle of that name or kind."""


def resolve_models_dir(models_dir: Path | str | None = None) -> Path:
    """The models directory: ``models_dir``, else ``$ANIME_UDF_MODELS``, else ./models."""
    return Path(models_dir or os.environ.get(MODELS_ENV) or "models")


@dataclass
class BundleInfo:
    path: Path
    manifest: dict[str, Any] | None
    error: str | None = None

    @property
    def kind(self) -> str:
        return self.manifest["kind"] if self.manifest else "?"

    @property
    def created_at(self) -> str:
        return str(self.manifest.get("created_at", "")) if self.manifest else ""


def list_bundles(models_dir: Path | str | None = None, *, verify: bool = False) -> list[BundleInfo]:
    """Every bundle in the models directory, oldest first; broken ones carry their error
    (with ``verify``, a file that fails its checksum makes a bundle broken too)."""
    root = resolve_models_dir(models_dir)
    if not root.is_dir():
        return []
    recover_replaced(root)
    infos = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            infos.append(BundleInfo(path, read_manifest(path, verify=verify)))
        except BundleError as exc:
            infos.append(BundleInfo(path, None, str(exc)))
    return sorted(infos, key=lambda b: (b.created_at, b.path.name))


def newest(kind: str, models_dir: Path | str | None = None) -> Path | None:
    usable = [b for b in list_bundles(models_dir) if b.manifest and b.kind == kind]
    return usable[-1].path if usable else None


def newest_of_each_kind(models_dir: Path | str | None = None) -> list[Path]:
    """The newest bundle of each kind present, in the order of KINDS (the directory listed once)."""
    newest_by_kind = {b.kind: b.path for b in list_bundles(models_dir) if b.manifest}  # oldest first: newest wins
    return [newest_by_kind[kind] for kind in KINDS if kind in newest_by_kind]


def no_bundle_message(models_dir: Path | str | None = None, kind: str | None = None) -> str:
    """What to say where the models directory has no bundle (of ``kind``) to use, and how to make one."""
    return (f"no {f'{kind} bundle' if kind else 'model bundles'} in {resolve_models_dir(models_dir).resolve()}; "
            f"train one with `anime-udf train {kind or 'baseline'} --data CATALOG`, or pass --models DIR")


def get_model(name: str, models_dir: Path | str | None = None) -> Path:
    """A bundle by path, by directory name in the models directory, or by kind (its newest)."""
    path = Path(name)
    for parent in {path.parent, resolve_models_dir(models_dir)}:
        recover_replaced(parent)
    if path.is_dir():
        return path
    candidate = resolve_models_dir(models_dir) / name
    if candidate.is_dir():
        return candidate
    if name in KINDS:
        found = newest(name, models_dir)
        if found:
            return found
    known = ", ".join(b.path.name for b in list_bundles(models_dir)) or "none"
    raise UnknownModelError(
        f"unknown model {name!r}: not a bundle directory, and not in {resolve_models_dir(models_dir)} (bundles there: {known})"
    )
