"""Model bundles: a directory of manifest.json + *.safetensors (+ tokenizer files).

Loading a bundle never runs code: weights are safetensors, everything else JSON or
plain tokenizer files. Every file's sha256 is in the manifest, so a missing,
truncated or swapped file gives one clear error naming it. Bundles are written to a
temporary sibling directory and renamed into place, so a failed run leaves none; a
bundle is replaced only by one of its kind, when asked, and never anything else.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anime_udf.errors import AnimeUdfError
from anime_udf.files import process_running

if TYPE_CHECKING:
    import numpy as np
    import torch

# 2: seed ensembles, the lexical view, text_model.in_bundle; 3: the fusion head of BaselineNet's
# shape (studio_dim 0 = one-hot studios)
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
# Every file a bundle holds is named here, and nowhere else: the heads' weights by kind, the
# lexical view's two files, the explanation references, a bundled encoder and its tokenizer.
HEAD_WEIGHTS = {"baseline": "model.safetensors", "fusion": "head.safetensors"}
LEXICAL_VOCABULARY_FILE = "lexical/vocabulary.json"
LEXICAL_WEIGHTS_FILE = "lexical/weights.safetensors"
REFERENCE_FILE = "explain.safetensors"
# The content hashes of the rows training saw (anime_udf.comparison.row_hashes), so that a comparison
# leaves them out; a bundle trained before they were recorded has none.
TRAINING_ROWS_FILE = "training_rows.safetensors"
# Prediction intervals (anime_udf.intervals): the calibration rows' errors and the scale model.
# Optional: bundles trained before intervals still score; their intervals say how to get one.
CALIBRATION_FILE = "calibration.safetensors"
ENCODER_DIR, TOKENIZER_DIR = "encoder", "tokenizer"
KINDS = ("baseline", "fusion")
POOLINGS = ("mean", "cls")  # how an encoder's token states become one text vector


class BundleError(AnimeUdfError, RuntimeError):
    """A bundle is missing, truncated or inconsistent."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_bundle(
    out: Path,
    manifest: dict[str, Any],
    weights: dict[str, dict[str, torch.Tensor]],
    extra_dirs: dict[str, Path] | None = None,
    *,
    force: bool = False,
) -> Path:
    """Write ``out`` atomically. ``weights`` maps file names to state dicts;
    ``extra_dirs`` maps bundle sub-directories to directories to copy (tokenizer files).
    An existing ``out`` is replaced only with ``force`` and only if it is a bundle of the same
    kind (:func:`check_out`)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_replaced(out.parent)
    check_out(out, manifest["kind"], force=force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
    try:
        for sub, src in (extra_dirs or {}).items():
            shutil.copytree(src, tmp / sub)
        for name, state in weights.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            save_state(state, tmp / name)
        files = {
            str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        full = {"format_version": FORMAT_VERSION, "created_at": now_iso(), **manifest, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
        _share(tmp)
        _fsync_tree(tmp)
        if out.exists():
            # Set the old bundle aside, move the new one in, then remove the old one. A write
            # killed between the two renames leaves the old one aside: recover_replaced puts it
            # back the next time the directory is listed, resolved or written.
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_out(out: Path | str, kind: str, *, force: bool = False) -> None:
    """Where a ``kind`` bundle may be written: a path that does not exist, or with ``force`` a
    complete bundle of the same kind. A directory of other files (the models directory itself,
    say) or a bundle of the other kind is never replaced. Cheap: call it before training."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    try:
        existing = read_manifest(out)["kind"]
    except BundleError as exc:
        raise BundleError(f"{out}: already exists and is not a complete model bundle, so it is never replaced "
                          f"({exc}); choose another --out") from None
    if existing != kind:
        raise BundleError(f"{out}: holds a {existing} bundle, which a {kind} bundle never replaces; "
                          "choose another --out")
    if not force:
        raise BundleError(f"{out}: a {kind} bundle is already there; pass --force to replace it")


# What a write killed mid-way leaves beside ``NAME`` (write_bundle): the old bundle set aside
# while replacing it, and the new one being written; the number is the writer's process id.
_SET_ASIDE = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.old")
_PARTIAL = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.\w+\.partial")


def recover_replaced(directory: Path | str) -> None:
    """Finish what writes killed in ``directory`` left: an old bundle set aside whose replacement
    never arrived is renamed back, one whose replacement did is removed, and half-written bundles
    are removed. Writers still running are left alone; a read-only directory is left as it is."""
    try:
        entries = sorted(Path(directory).iterdir())
    except OSError:  # no such directory, or not ours to list
        return
    for entry in entries:
        aside, partial = _SET_ASIDE.fullmatch(entry.name), _PARTIAL.fullmatch(entry.name)
        found = aside or partial
        if not found or not entry.is_dir() or entry.is_symlink() or process_running(int(found["pid"])):
            continue
        target = entry.with_name(found["name"])
        try:
            if aside and not target.exists():
                entry.rename(target)
            elif partial or _is_bundle(target):
                shutil.rmtree(entry)
        except OSError:
            pass  # left for a run that may write here


def _is_bundle(path: Path) -> bool:
    try:
        read_manifest(path, verify=False)
    except BundleError:
        return False
    return True


def _share(root: Path) -> None:
    """A bundle is meant to be shared: directories 0755, files 0644 (mkdtemp and safetensors
    make them private)."""
    root.chmod(0o755)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file  # torch: imported where weights are, not for listing bundles

    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def read_manifest(bundle: Path | str, *, verify: bool = True) -> dict[str, Any]:
    """Read and check a bundle's manifest; with ``verify``, also every file's checksum."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such model bundle directory")
    if not path.is_file():
        raise BundleError(f"{path}: missing; {bundle} is not a complete model bundle")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON (truncated or corrupted?): {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: unsupported bundle format {manifest.get('format_version')!r} "
                          f"(this anime-udf reads format {FORMAT_VERSION}; retrain the model)")
    if manifest.get("kind") not in KINDS:
        raise BundleError(f"{path}: unknown model kind {manifest.get('kind')!r}")
    check_schema(path, manifest)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        raise BundleError(f"{path}: 'files' must list every file of the bundle with its sha256")
    for name in files:
        _check_inside(bundle, name, path)
    if verify:
        listed = {Path(name) for name in files}
        for file in sorted(bundle.rglob("*")):
            relative = file.relative_to(bundle)
            if file.is_symlink() or (file.is_file() and relative != Path(MANIFEST) and relative not in listed):
                raise BundleError(f"{file}: not listed in {path} (every file of a bundle is, with its checksum)")
        for name, sha in files.items():
            file = bundle / name
            if not file.is_file():
                raise BundleError(f"{file}: missing from the bundle")
            try:
                actual = file_sha256(file)
            except OSError as exc:  # e.g. another user's file we may not read
                raise BundleError(f"{file}: cannot read it: {exc.strerror or exc}") from exc
            if actual != sha:
                raise BundleError(f"{file}: checksum mismatch (truncated or modified)")
    return manifest


def _check_inside(bundle: Path, name: str, manifest_path: Path) -> None:
    """A listed file is a plain relative path inside the bundle, through no symlink:
    refused before anything is opened, so a manifest cannot make us read elsewhere."""
    relative = Path(name)
    if (not name or relative.is_absolute() or ".." in relative.parts or "\\" in name
            or any(part in ("", ".") for part in name.split("/"))):
        raise BundleError(f"{manifest_path}: file entry {name!r} is not a plain relative path inside the bundle")
    current = bundle
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise BundleError(f"{manifest_path}: file entry {name!r} goes through a symbolic link ({current})")


def _number(lo: float, hi: float, integer: bool = False, above: bool = False):
    """A finite number in [lo, hi] (or (lo, hi] with ``above``), not a bool."""
    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            return False
        return math.isfinite(v) and (v > lo if above else v >= lo) and v <= hi

    kind = "an integer" if integer else "a number"
    return ok, f"{kind} in {'(' if above else '['}{lo:g}, {hi:g}]"


_STRINGS = (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings")
_TEXT = (lambda v: isinstance(v, str) and v != "", "a non-empty string")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
# The manifest keys scoring relies on, and what each must be: checked before anything is built,
# so a hand-edited manifest gives one error naming the key instead of a crash or a 1 TB allocation.
_SCHEMA = {
    ("features", "genres"): _STRINGS,
    ("features", "studios"): _STRINGS,
    ("features", "episodes_log_mean"): _number(-1e3, 1e3),
    ("features", "episodes_log_std"): _number(0, 1e3, above=True),
    ("target", "mean"): _number(-1e3, 1e3),
    ("target", "std"): _number(0, 1e3, above=True),
    ("text_model", "name"): _TEXT,
    ("text_model", "checksum"): _TEXT,
    ("text_model", "in_bundle"): _BOOL,
    ("text_model", "pooling"): (lambda v: v in POOLINGS, " or ".join(map(repr, POOLINGS))),
    ("text_model", "max_length"): _number(1, 8192, integer=True),
    ("model", "text_dim"): _number(1, 8192, integer=True),
    ("model", "studio_dim"): _number(0, 1024, integer=True),  # 0: one-hot
    ("model", "dropout"): _number(0, 1),
    ("model", "seeds"): _number(1, 64, integer=True),
}
_FUSION_SCHEMA = {("lexical", "ngram_max"): _number(1, 5, integer=True)}
# Optional (bundles trained before it have none: the head alone).
_BLEND_SCHEMA = {("blend", weight): _number(-100, 100) for weight in ("head", "lexical", "constant")}
_CALIBRATION_SCHEMA = {("calibration", "rows"): _number(1, 1e9, integer=True),
                       ("calibration", "log_scale_centre"): _number(-100, 100)}


def check_schema(path: Path, manifest: dict[str, Any]) -> None:
    schema = (_SCHEMA | (_FUSION_SCHEMA if manifest["kind"] == "fusion" else {})
              | (_BLEND_SCHEMA if "blend" in manifest else {})
              | (_CALIBRATION_SCHEMA if "calibration" in manifest else {}))
    for keys, (ok, expected) in schema.items():
        value: Any = manifest
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                raise BundleError(f"{path}: {'.'.join(keys)} is missing; expected {expected}")
            value = value[key]
        if not ok(value):
            raise BundleError(f"{path}: {'.'.join(keys)} is {json.dumps(value)[:60]}; expected {expected}")


def training_row_hashes(bundle: Path | str) -> np.ndarray | None:
    """The sorted content hashes ((n, 16) uint8) of the rows a bundle's training saw, None where it
    does not record them (checked against the manifest by ``read_manifest``, as every file is)."""
    path = Path(bundle) / TRAINING_ROWS_FILE
    if not path.is_file():
        return None
    from safetensors.numpy import load_file  # numpy, not torch: comparing bundles loads no model for this

    try:
        return load_file(str(path))["hashes"]
    except Exception as exc:  # safetensors raises its own errors for a damaged file
        raise BundleError(f"{path}: cannot read the training rows' hashes: {exc}") from exc


def load_weights(bundle: Path | str, name: str) -> dict[str, torch.Tensor]:
    """A bundle's weight file, refused if it holds NaN or infinite values (scores must be finite)."""
    from safetensors.torch import load_file

    path = Path(bundle) / name
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise BundleError(f"{path}: cannot load weights: {exc}") from exc
    bad = nonfinite_tensor(state)
    if bad:
        raise BundleError(f"{path}: weights {bad!r} hold NaN or infinite values")
    return state


def shape_mismatch(state: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> str | None:
    """What is wrong with the first tensor of ``state`` missing or not of its ``expected`` shape, or None."""
    for name, shape in expected.items():
        found = tuple(state[name].shape) if name in state else None
        if found != shape:
            return f"{name} has shape {found}; expected {shape}"
    return None


def nonfinite_tensor(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of ``state`` holding NaN or ±inf, or None."""
    import torch

    return next((name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
