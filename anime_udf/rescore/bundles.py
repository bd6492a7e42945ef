"""Which bundles a run scores, and each one's model id."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anime_udf.bundle import KINDS, read_manifest
from anime_udf.intervals import has_calibration
from anime_udf.registry import Serving, get_model, no_bundle_message, serving, serving_each_kind
from anime_udf.rescore.run import RescoreError

# Manifest entries that describe a bundle without changing its predictions: they do
# not enter the model id, so a copied or renamed bundle keeps its scores.
DESCRIPTIVE_MANIFEST_KEYS = frozenset({"created_at", "name", "metrics", "training"})


def model_id(bundle: Path | str, manifest: dict[str, Any] | None = None) -> str:
    """``<kind>-<12 hex>``: a hash of everything in the bundle that affects its scores
    (every file's sha256, vocabularies, scalers, architecture, text encoder checksum).
    A retrained bundle gets a new id even under the same name; a copy keeps its id."""
    manifest = manifest if manifest is not None else read_manifest(bundle, verify=False)
    relevant = {k: v for k, v in manifest.items() if k not in DESCRIPTIVE_MANIFEST_KEYS}
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"{manifest['kind']}-{digest[:12]}"


@dataclass(frozen=True)
class ModelChoice:
    kind: str
    path: Path
    model_id: str
    # Why this bundle: "production" (the kind's production alias), "newest" (no alias set),
    # None (named by the caller).
    alias: str | None = None


def resolve_models(specs: str | Sequence[str], models_dir: Path | str | None = None,
                   level: float | None = None) -> list[ModelChoice]:
    """``all`` (each kind present), a kind (its production bundle, else its newest), or
    bundle names/paths, in the models directory (``models_dir``). Every bundle's files are checked
    against its manifest; a store keeps one model of each kind. With a ``level``, every bundle
    must have its calibration (to score intervals)."""
    specs = [specs] if isinstance(specs, str) else list(specs) or ["all"]
    found: list[tuple[Path, str | None]] = []
    for spec in specs:
        if spec == "all":
            each = serving_each_kind(models_dir)
            if not each:
                raise RescoreError(no_bundle_message(models_dir))
            found.extend((s.path, s.via) for s in each)
        elif spec in KINDS:
            one: Serving | None = serving(spec, models_dir)
            if one is None:
                raise RescoreError(no_bundle_message(models_dir, spec))
            found.append((one.path, one.via))
        else:
            found.append((get_model(spec, models_dir), None))
    choices: dict[str, ModelChoice] = {}
    for path, alias in found:
        manifest = read_manifest(path)  # verifies every file's checksum
        kind = manifest["kind"]
        if level is not None and not has_calibration(manifest):
            raise RescoreError(f"{path}: this bundle has no calibration (it was trained before prediction "
                               f"intervals), so it cannot store intervals at --level {level:g}; rescore without "
                               f"--level, or retrain it with `anime-udf train {kind}`")
        if kind in choices and choices[kind].path.resolve() != path.resolve():
            raise RescoreError(f"two {kind} bundles chosen ({choices[kind].path} and {path}); "
                               "a store keeps one model of each kind")
        choices[kind] = ModelChoice(kind, path, model_id(path, manifest), alias)
    return [choices[k] for k in KINDS if k in choices]
