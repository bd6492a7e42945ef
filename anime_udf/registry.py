"""The models directory: listing bundles, its aliases (which bundle of a kind serves), and
resolving a model by name, path or kind.

Aliases live in ``aliases.json`` in the models directory: ``{"aliases": {"production":
{kind: bundle name}}, "history": [...]}``. Readers read it without a lock (it is only ever
replaced whole: ``files.atomic_file``); writers change it under ``.aliases.lock`` (an exclusive
``flock``, released by the kernel when its holder dies) and only if the kind's alias is still
what they checked (compare and swap), so a promotion never undoes one it did not see.

Test hook: ``ANIME_UDF_ALIASES_PAUSE_AT=<phase>`` (``locked``: the lock held, nothing written;
``written``: the new file written and fsynced beside the old one, not yet renamed over it)
pauses a writer there (``ANIME_UDF_ALIASES_PAUSE_SECONDS``, default an hour), so that a test can
``kill -9`` it at a known place.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from anime_udf.errors import AnimeUdfError
from anime_udf.bundle import KINDS, BundleError, now_iso, read_manifest, recover_replaced
from anime_udf.files import atomic_file, pause_at

MODELS_ENV = "ANIME_UDF_MODELS"
ALIASES_FILE = "aliases.json"
ALIASES_LOCK = ".aliases.lock"
ALIASES_PAUSE_ENV, ALIASES_PAUSE_SECONDS_ENV = "ANIME_UDF_ALIASES_PAUSE_AT", "ANIME_UDF_ALIASES_PAUSE_SECONDS"
PRODUCTION = "production"  # the alias every reader follows
LOCK_WAIT_SECONDS = 30.0


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


class AliasError(AnimeUdfError, RuntimeError):
    """The aliases file is unreadable, points at no usable bundle, or moved under a writer."""


@dataclass
class Aliases:
    """The aliases file as read: ``production`` is {kind: bundle name}; ``history`` every change,
    oldest first, each {at, kind, alias, action (promote, rollback, or refuse: a promotion
    ``train --promote-if-better`` refused, which changed nothing), from, to}."""

    production: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def read_aliases(models_dir: Path | str | None = None) -> Aliases:
    """The models directory's aliases; none where it has no aliases file."""
    path = resolve_models_dir(models_dir) / ALIASES_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return Aliases()
    except (OSError, ValueError) as exc:
        raise AliasError(f"{path}: cannot read the aliases: {exc}") from exc
    aliases = data.get("aliases") if isinstance(data, dict) else None
    production = aliases.get(PRODUCTION, {}) if isinstance(aliases, dict) else None
    history = data.get("history", []) if isinstance(data, dict) else None
    if (not isinstance(production, dict) or not all(k in KINDS and isinstance(v, str) for k, v in production.items())
            or not isinstance(history, list) or not all(isinstance(e, dict) for e in history)):
        raise AliasError(f"{path}: not an aliases file (expected {{\"aliases\": {{\"{PRODUCTION}\": "
                         "{kind: bundle name}}, \"history\": [...]}})")
    return Aliases(dict(production), history)


def resolve(kind: str, models_dir: Path | str | None = None) -> Path | None:
    """The bundle of ``kind`` that serves where a reader is given none: the kind's production alias
    where one is set, else its newest bundle (``None``: there is none)."""
    found = serving(kind, models_dir)
    return found.path if found else None


@dataclass(frozen=True)
class Serving:
    """The bundle that serves a kind, and why: ``via`` is ``production`` (the kind's alias names it)
    or ``newest`` (no alias is set: the kind's newest bundle serves)."""

    kind: str
    path: Path
    via: str


def serving(kind: str, models_dir: Path | str | None = None) -> Serving | None:
    """``resolve``, saying why; ``None`` where no bundle of ``kind`` serves. Only ``kind``'s alias is
    read: another kind's broken alias does not stop this one."""
    name = read_aliases(models_dir).production.get(kind)
    if name is not None:
        return Serving(kind, aliased_bundle(kind, name, models_dir), PRODUCTION)
    path = newest(kind, models_dir)
    return Serving(kind, path, "newest") if path else None


def serving_each_kind(models_dir: Path | str | None = None) -> list[Serving]:
    """What serves each kind present (its production bundle, else its newest), in the order of KINDS;
    the aliases file is read once, so every kind is resolved against the same aliases."""
    production = read_aliases(models_dir).production
    newest_by_kind = {b.kind: b.path for b in list_bundles(models_dir) if b.manifest}  # oldest first: newest wins
    return [Serving(kind, aliased_bundle(kind, production[kind], models_dir), PRODUCTION) if kind in production
            else Serving(kind, newest_by_kind[kind], "newest")
            for kind in KINDS if kind in production or kind in newest_by_kind]


def aliased_bundle(kind: str, name: str, models_dir: Path | str | None = None) -> Path:
    """The bundle an alias of ``kind`` names, which must be there and of that kind: an alias
    pointing nowhere is an error, never a silent fall back to the newest bundle."""
    root = resolve_models_dir(models_dir)
    recover_replaced(root)
    path = root / name
    fix = f"promote another (`anime-udf promote BUNDLE`) or roll back (`anime-udf promote --rollback {kind}`)"
    if Path(name).name != name or not path.is_dir():
        raise AliasError(f"the {PRODUCTION} alias of {kind} names {name!r}, which is not a bundle in {root}; {fix}")
    found = read_manifest(path, verify=False)["kind"]
    if found != kind:
        raise AliasError(f"the {PRODUCTION} alias of {kind} names {name}, a {found} bundle; {fix}")
    return path


def resolve_each_kind(models_dir: Path | str | None = None) -> list[Path]:
    """``resolve`` for each kind present (its production bundle, else its newest), in the order of KINDS."""
    return [s.path for s in serving_each_kind(models_dir)]


@contextmanager
def aliases_lock(models_dir: Path | str | None = None, wait: float = LOCK_WAIT_SECONDS) -> Iterator[None]:
    """Hold the models directory's ``.aliases.lock`` (an exclusive ``flock``) for one change."""
    root = resolve_models_dir(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ALIASES_LOCK, "a") as fh:  # closing the descriptor releases the flock
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise AliasError(f"{root / ALIASES_LOCK}: another promotion has held it for {wait:.0f} s; "
                                     "try again when it has finished") from None
                time.sleep(0.05)
        yield


def set_production(kind: str, name: str | None, expected: str | None, action: str,
                   models_dir: Path | str | None = None, **record: Any) -> dict[str, Any]:
    """Point ``kind``'s production alias at bundle ``name`` (``None``: unset it, so that the newest
    serves), provided it still names ``expected`` (what the caller checked and reports as the old
    value); the change is appended to the history, with ``record`` (the comparison that decided it).
    Returns the history entry."""
    path = resolve_models_dir(models_dir) / ALIASES_FILE
    with aliases_lock(models_dir):
        pause_at(ALIASES_PAUSE_ENV, "locked", ALIASES_PAUSE_SECONDS_ENV, "promote")
        current = read_aliases(models_dir)
        if current.production.get(kind) != expected:
            raise AliasError(f"the {PRODUCTION} alias of {kind} moved while this command checked it "
                             f"(was {expected or 'unset'}, now {current.production.get(kind) or 'unset'}); "
                             "nothing changed: run it again to act on the new value")
        entry = {"at": now_iso(), "kind": kind, "alias": PRODUCTION, "action": action, "from": expected, "to": name,
                 **record}
        production = {k: v for k, v in current.production.items() if k != kind} | ({kind: name} if name else {})
        content = {"aliases": {PRODUCTION: dict(sorted(production.items()))}, "history": [*current.history, entry]}
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(content, indent=2) + "\n")
            pause_at(ALIASES_PAUSE_ENV, "written", ALIASES_PAUSE_SECONDS_ENV, "promote")
    return entry


def rollback_entry(aliases: Aliases, kind: str) -> dict[str, Any] | None:
    """The promotion of ``kind`` that a rollback undoes (its ``from`` is what serves again): the
    latest one not already undone, as rollbacks undo promotions last first; None: nothing to undo."""
    undone = 0
    for entry in reversed(aliases.history):
        if entry.get("kind") != kind or entry.get("action") not in ("promote", "rollback"):  # a refusal changed nothing
            continue
        if entry.get("action") == "rollback":
            undone += 1
        elif undone:
            undone -= 1
        else:
            return entry
    return None


def decisions(aliases: Aliases) -> dict[tuple[str, str], dict[str, Any]]:
    """The latest ``train --promote-if-better`` decision about each bundle, by (kind, bundle name):
    the history entry that recorded it (``promoted``, ``incumbent``, and ``comparison`` or ``refused``)."""
    return {(e["kind"], e["challenger"]): e for e in aliases.history
            if isinstance(e.get("challenger"), str) and "kind" in e}


def no_bundle_message(models_dir: Path | str | None = None, kind: str | None = None) -> str:
    """What to say where the models directory has no bundle (of ``kind``) to use, and how to make one."""
    return (f"no {f'{kind} bundle' if kind else 'model bundles'} in {resolve_models_dir(models_dir).resolve()}; "
            f"train one with `anime-udf train {kind or 'baseline'} --data CATALOG`, or pass --models DIR")


def get_model(name: str, models_dir: Path | str | None = None) -> Path:
    """A bundle by path, by directory name in the models directory, or by kind (its production
    bundle, else its newest)."""
    path = Path(name)
    for parent in {path.parent, resolve_models_dir(models_dir)}:
        recover_replaced(parent)
    if path.is_dir():
        return path
    candidate = resolve_models_dir(models_dir) / name
    if candidate.is_dir():
        return candidate
    if name in KINDS:
        found = resolve(name, models_dir)
        if found:
            return found
    known = ", ".join(b.path.name for b in list_bundles(models_dir)) or "none"
    raise UnknownModelError(
        f"unknown model {name!r}: not a bundle directory, and not in {resolve_models_dir(models_dir)} (bundles there: {known})"
    )


def model_list(models_dir: Path | str | None = None) -> tuple[list[dict[str, Any]], AnimeUdfError | None]:
    """``anime-udf models``: a row per bundle (every file's checksum verified: one that would fail to
    load is listed with its error), which one serves its kind and its latest promotion decision; and
    the error of an alias naming no usable bundle or an unreadable aliases file, where there is one
    (the list is still worth showing)."""
    alias_error = None
    try:
        serves = {s.path.name: s.via for s in serving_each_kind(models_dir)}  # production or newest
        decided = decisions(read_aliases(models_dir))
    except AnimeUdfError as exc:
        serves, decided, alias_error = {}, {}, exc
    rows = []
    for b in list_bundles(models_dir, verify=True):
        m = b.manifest or {}
        figures = {f"valid_{k}": manifest_value(m, "metrics", "valid", k) for k in ("mae", "rmse", "spearman")}
        rows.append({
            "kind": b.kind, "name": b.path.name, "serves": serves.get(b.path.name), "created_at": b.created_at,
            "data": str(manifest_value(m, "training", "data_fingerprint") or ""),
            **{k: v if isinstance(v, (int, float)) and not isinstance(v, bool) else None for k, v in figures.items()},
            "error": b.error,
            "decision": {k: v for k, v in decided[(b.kind, b.path.name)].items()
                         if k in ("at", "promoted", "incumbent", "comparison", "refused")}
            if (b.kind, b.path.name) in decided else None,
        })
    return rows, alias_error


def manifest_value(manifest: dict[str, Any], *keys: str) -> Any:
    """A nested value, or None where a level is missing or not an object (hand-edited manifests)."""
    for key in keys:
        manifest = manifest.get(key) if isinstance(manifest, dict) else None
    return manifest


def format_model_list(rows: list[dict[str, Any]], models_dir: Path | str | None = None) -> str:
    """``models``' screen: a line per bundle of ``model_list`` (and its decision), or what to run."""
    if not rows:
        return f"no bundles in {models_dir}; train one with `anime-udf train baseline --data CATALOG`"
    lines = []
    for r in rows:
        if r["error"]:
            lines.append(f"{'broken':9} {r['name']:32} {r['error']}")
            continue
        figures = " ".join(f"{k[6:]}={r[k]:.3f}" for k in ("valid_mae", "valid_rmse", "valid_spearman")
                           if r[k] is not None)
        lines.append(f"{r['kind']:9} {r['name']:32} {r['serves'] or '':10} {r['created_at']:26} {r['data']:24} "
                     f"{figures}")
        if r["decision"]:
            lines.append(f"{'':9} {describe_decision(r['decision'])}")
    return "\n".join(lines)


def describe_decision(decision: dict[str, Any]) -> str:
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
