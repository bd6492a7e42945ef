"""What `anime-udf promote` does: point a kind's production alias at a bundle, or roll its latest
promotion back, once the bundle that will serve checks out (registry.py keeps the aliases and
their history; `train --promote-if-better` decides with training/promotion.py)."""

from __future__ import annotations

from pathlib import Path

from anime_udf.bundle import read_manifest
from anime_udf.errors import OptionError
from anime_udf.registry import (ALIASES_FILE, PRODUCTION, AliasError, Aliases, aliased_bundle, get_model, newest,
                                read_aliases, resolve_models_dir, rollback_entry, set_production)
from anime_udf.text import text_encoder_dirs


def promote(bundle: str, models_dir: Path | str | None = None) -> str:
    """Make ``bundle`` (a name or directory in the models directory) its kind's production bundle.
    Returns the line that says the change (old -> new)."""
    aliases = read_aliases(models_dir)
    path = get_model(bundle, models_dir)
    root = resolve_models_dir(models_dir)
    if path.resolve().parent != root.resolve():
        raise OptionError(f"{path} is not in the models directory {root}; copy it there first", "BUNDLE")
    kind = read_manifest(path, verify=False)["kind"]
    return point_production(kind, path.name, path, aliases, "promote", models_dir)


def rollback(kind: str, models_dir: Path | str | None = None) -> str:
    """Undo ``kind``'s latest promotion: its production alias goes back to the bundle it named
    before (or is unset, so that the newest serves). Returns the line that says the change."""
    aliases = read_aliases(models_dir)
    undone = rollback_entry(aliases, kind)
    if undone is None:
        raise AliasError(f"no promotion of {kind} to roll back in {resolve_models_dir(models_dir) / ALIASES_FILE}")
    target = undone["from"]
    path = aliased_bundle(kind, target, models_dir) if target else None
    return point_production(kind, target, path, aliases, "rollback", models_dir)


def point_production(kind: str, target: str | None, path: Path | None, aliases: Aliases, action: str,
                     models_dir: Path | str | None) -> str:
    """Point ``kind``'s alias (as read in ``aliases``) at ``target`` (None: unset it), after checking
    its bundle ``path``: a broken bundle never serves."""
    old = aliases.production.get(kind)
    if path is not None:
        text_encoder_dirs(path, read_manifest(path))  # every file's checksum, and the encoder it needs
    if old == target:
        return f"{kind} {PRODUCTION}: {target} (unchanged)"
    set_production(kind, target, old, action, models_dir)
    unset = f"unset (the newest serves: {getattr(newest(kind, models_dir), 'name', 'none')})"
    return f"{kind} {PRODUCTION}: {old or unset} -> {target or unset}"
