"""A missing, truncated or inconsistent bundle gives one clear error naming the file."""

import json
import os
import shutil

import numpy as np
import pytest

from anime_udf.bundle import BundleError, load_weights, read_manifest, write_bundle
from anime_udf.scoring import load_scorer
from tests.conftest import CATALOG


@pytest.fixture
def bundle(baseline_bundle, tmp_path):
    return shutil.copytree(baseline_bundle, tmp_path / "copy")


def test_bundle_is_safetensors_and_json_only(baseline_bundle):
    names = sorted(p.name for p in baseline_bundle.iterdir())
    assert names == ["calibration.safetensors", "explain.safetensors", "manifest.json", "model.safetensors",
                     "training_rows.safetensors"]
    manifest = read_manifest(baseline_bundle)
    assert manifest["kind"] == "baseline" and manifest["metrics"]["valid"]["n"] == 80
    assert manifest["training"]["data_fingerprint"].startswith("sha256:")


def test_a_bundle_records_the_rows_it_was_trained_on(baseline_bundle):
    from anime_udf.bundle import training_row_hashes
    from anime_udf.catalog import read_catalog
    from anime_udf.comparison import input_hashes

    recorded = training_row_hashes(baseline_bundle)  # sorted 128-bit content hashes, one per distinct row
    assert recorded.dtype == np.uint8 and recorded.shape[1] == 16
    hexes = [row.tobytes().hex() for row in recorded]
    assert hexes == sorted(set(input_hashes(read_catalog(CATALOG))))  # every training row, nothing else


def test_the_manifest_holds_the_entries_design_lists(baseline_bundle, fusion_bundle):
    """DESIGN.md, "Bundle format": every entry of either kind's manifest, and only those, is in the
    tree's list; ``blend`` is there with --blend (which the fixtures leave off) and nowhere else."""
    from tests.test_project import design_bundle_tree

    entries = design_bundle_tree()[1]
    found = set(read_manifest(baseline_bundle)) | set(read_manifest(fusion_bundle))
    assert set(entries) == found | {"blend"} and len(entries) == len(set(entries))
    assert "lexical" in read_manifest(fusion_bundle) and "lexical" not in read_manifest(baseline_bundle)


def test_missing_weights_named(bundle):
    (bundle / "model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"model\.safetensors: missing"):
        load_scorer(bundle)


def test_truncated_weights_named(bundle):
    path = bundle / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"model\.safetensors: checksum mismatch"):
        load_scorer(bundle)


def test_truncated_manifest_named(bundle):
    path = bundle / "manifest.json"
    path.write_text(path.read_text()[:200])
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON"):
        load_scorer(bundle)


def test_missing_manifest_and_directory_named(bundle, tmp_path):
    (bundle / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest\.json: missing"):
        load_scorer(bundle)
    with pytest.raises(BundleError, match="no such model bundle"):
        load_scorer(tmp_path / "nowhere")


def test_inconsistent_manifest_named(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["features"]["genres"].append("extra-genre")  # weights no longer fit
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"model\.safetensors: weights do not match"):
        load_scorer(bundle)


def test_failed_write_leaves_no_bundle(tmp_path):
    class Boom(dict):
        def items(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_bundle(tmp_path / "b", {"kind": "baseline"}, Boom())
    assert list(tmp_path.iterdir()) == []


def _edit_manifest(bundle, edit) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("entry", ["../../../../etc/passwd", "/etc/shadow", "a/../../outside", "./model.safetensors",
                                   "a//b", ""])
def test_file_entries_outside_the_bundle_are_refused_before_reading(bundle, entry, monkeypatch):
    _edit_manifest(bundle, lambda m: m["files"].__setitem__(entry, "0" * 64))
    opened = []
    monkeypatch.setattr("anime_udf.bundle.file_sha256", lambda p: opened.append(p) or "x")
    with pytest.raises(BundleError, match="not a plain relative path inside the bundle"):
        load_scorer(bundle)
    assert opened == []


def test_symlinked_and_unlisted_files_are_refused(bundle, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (bundle / "link.safetensors").symlink_to(secret)
    _edit_manifest(bundle, lambda m: m["files"].__setitem__("link.safetensors", "0" * 64))
    with pytest.raises(BundleError, match="goes through a symbolic link"):
        load_scorer(bundle)
    (bundle / "link.safetensors").unlink()
    _edit_manifest(bundle, lambda m: m["files"].pop("link.safetensors"))
    (bundle / "extra.safetensors").write_bytes(b"unlisted")
    with pytest.raises(BundleError, match=r"extra\.safetensors: not listed in"):
        load_scorer(bundle)


@pytest.mark.parametrize("files", [None, {}, [], {"model.safetensors": 1}])
def test_a_manifest_must_list_its_files(bundle, files):
    _edit_manifest(bundle, lambda m: m.__setitem__("files", files) if files is not None else m.pop("files"))
    with pytest.raises(BundleError, match="'files' must list every file"):
        load_scorer(bundle)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("features"), r"features\.genres is missing"),
    (lambda m: m.pop("target"), r"target\.mean is missing"),
    (lambda m: m["model"].__setitem__("dropout", "x"), r'model\.dropout is "x"; expected a number in \[0, 1\]'),
    (lambda m: m["model"].__setitem__("studio_dim", 1_000_000_000), r"model\.studio_dim is 1000000000; expected an integer"),
    (lambda m: m["target"].__setitem__("std", float("nan")), r"target\.std is NaN; expected a number in \(0, 1000\]"),
    (lambda m: m["model"].__setitem__("seeds", True), r"model\.seeds is true"),
    (lambda m: m["features"].__setitem__("genres", "Action"), r"features\.genres is \"Action\"; expected a list"),
    (lambda m: m.__setitem__("blend", {"head": 1, "lexical": 0}), r"blend\.constant is missing"),
    (lambda m: m.__setitem__("blend", {"head": float("inf"), "lexical": 0, "constant": 0}), r"blend\.head is Infinity"),
])
def test_manifest_values_are_checked_before_anything_is_built(bundle, edit, message):
    _edit_manifest(bundle, edit)
    with pytest.raises(BundleError, match=rf"manifest\.json: {message}"):
        load_scorer(bundle)


@pytest.mark.parametrize("content", ["null", "[]", '"text"'])
def test_a_manifest_that_is_not_an_object_is_a_clear_error(bundle, content):
    (bundle / "manifest.json").write_text(content)
    with pytest.raises(BundleError, match="manifest.json: expected a JSON object"):
        load_scorer(bundle)


def test_an_unreadable_weight_file_is_named(bundle, monkeypatch):
    import builtins

    real_open = builtins.open

    def no_permission(file, *args, **kwargs):  # as for another user's file (root reads anything)
        if str(file).endswith("model.safetensors"):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_permission)
    with pytest.raises(BundleError, match=r"model\.safetensors: cannot read it: Permission denied"):
        load_scorer(bundle)


def test_write_bundle_checks_its_out_again_at_write_time(bundle, fusion_bundle, tmp_path):
    weights = {"model.safetensors": load_weights(bundle, "model.safetensors")}
    manifest = {k: v for k, v in read_manifest(bundle).items() if k not in ("files", "format_version", "created_at")}
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(BundleError, match="notes: already exists and is not a complete model bundle"):
        write_bundle(tmp_path / "notes", manifest, weights, force=True)
    fusion = shutil.copytree(fusion_bundle, tmp_path / "fusion")
    with pytest.raises(BundleError, match="holds a fusion bundle, which a baseline bundle never replaces"):
        write_bundle(fusion, manifest, weights, force=True)
    with pytest.raises(BundleError, match="pass --force to replace it"):
        write_bundle(bundle, manifest, weights)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert read_manifest(fusion)["kind"] == "fusion" and sorted(p.name for p in tmp_path.iterdir()) == [
        "copy", "fusion", "notes"]


def test_a_bundle_is_shared_like_its_directory(bundle, tmp_path):
    written = write_bundle(tmp_path / "new", {"kind": "baseline"}, {"model.safetensors": load_weights(bundle, "model.safetensors")})
    assert {p.name: p.stat().st_mode & 0o777 for p in written.iterdir()} == {
        "manifest.json": 0o644, "model.safetensors": 0o644}
    assert written.stat().st_mode & 0o777 == 0o755


# A replacing write killed after each of its steps: the bundle's own directory is either the
# old bundle or the new one, as `anime-udf models` and resolution see it.
KILLED_WRITE = """
import os, pathlib, shutil, sys
from anime_udf.bundle import load_weights, read_manifest, write_bundle
out, step = pathlib.Path(sys.argv[1]), int(sys.argv[2])
manifest = {k: v for k, v in read_manifest(out).items() if k not in ("files", "format_version", "created_at")}
weights = {"model.safetensors": load_weights(out, "model.safetensors")}
manifest["name"] = "new"
steps = []
def dies_after(real):
    def step_done(*args):
        result = real(*args)
        steps.append(1)
        if len(steps) == step:
            os._exit(9)
        return result
    return step_done
pathlib.Path.rename = dies_after(pathlib.Path.rename)
shutil.rmtree = dies_after(shutil.rmtree)
write_bundle(out, manifest, weights, force=True)
"""


@pytest.mark.slow  # a process killed or holding the store
@pytest.mark.parametrize("step, survivor", [(1, "old"), (2, "new"), (3, "new")])
def test_a_replacing_write_killed_at_any_step_leaves_a_complete_bundle(baseline_bundle, tmp_path, step, survivor):
    import subprocess
    import sys

    from click.testing import CliRunner

    from anime_udf.cli import cli
    from anime_udf.registry import get_model
    from tests.conftest import ROOT

    models = tmp_path / "models"
    shutil.copytree(baseline_bundle, models / "b")
    _edit_manifest(models / "b", lambda m: m.__setitem__("name", "old"))
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(models / "b"), str(step)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    listed = CliRunner().invoke(cli, ["models", "--json", "--models", str(models)])
    assert [(b["name"], b["error"]) for b in json.loads(listed.output)] == [("b", None)]
    assert read_manifest(get_model("b", models))["name"] == survivor
    assert [p.name for p in models.iterdir()] == ["b"]  # nothing set aside or half-written is left


def _rewrite_weights(bundle, name, edit) -> None:
    """Change the tensors of a bundle's weight file and record its new checksum, as a tamperer would."""
    from safetensors.torch import load_file, save_file

    from anime_udf.bundle import file_sha256

    state = load_file(str(bundle / name))
    edit(state)
    save_file(state, str(bundle / name))
    _edit_manifest(bundle, lambda m: m["files"].__setitem__(name, file_sha256(bundle / name)))


def _poison(tensor_name, value):
    def edit(state):
        state[tensor_name] = state[tensor_name].clone()
        state[tensor_name].view(-1)[0] = value
    return edit


@pytest.mark.parametrize("kind, name, tensor, value", [
    ("baseline", "model.safetensors", "members.0.mlp.0.weight", float("nan")),
    ("fusion", "head.safetensors", "members.1.mlp.5.bias", float("inf")),
    ("fusion", "lexical/weights.safetensors", "idf", float("nan")),
    ("fusion", "lexical/weights.safetensors", "coef", float("-inf")),
    ("fusion", "lexical/weights.safetensors", "intercept", float("nan")),
])
def test_weights_holding_nan_or_inf_are_refused_at_load(kind, name, tensor, value, request, tmp_path):
    bundle = shutil.copytree(request.getfixturevalue(f"{kind}_bundle"), tmp_path / kind)
    _rewrite_weights(bundle, name, _poison(tensor, value))
    with pytest.raises(BundleError, match=rf"{kind}/{name}: weights '{tensor}' hold NaN or infinite values"):
        load_scorer(bundle)


@pytest.mark.parametrize("file, write, message", [
    ("lexical/vocabulary.json", lambda b: (b / "lexical/vocabulary.json").write_text("[" * 100_000),
     r"lexical/vocabulary\.json: not a JSON list of strings \(RecursionError\)"),
    ("lexical/weights.safetensors",
     lambda b: _rewrite_weights(b, "lexical/weights.safetensors", lambda s: s.__setitem__("intercept", s["intercept"][:0])),
     r"lexical/weights\.safetensors: intercept has shape \(0,\); expected \(1,\)"),
    ("lexical/weights.safetensors",
     lambda b: _rewrite_weights(b, "lexical/weights.safetensors", lambda s: s.__setitem__("idf", s["idf"].reshape(1, -1))),
     r"lexical/weights\.safetensors: idf has shape \(1, \d+\); expected \(\d+,\)"),
    ("lexical/weights.safetensors",
     lambda b: _rewrite_weights(b, "lexical/weights.safetensors", lambda s: s.pop("coef")),
     r"lexical/weights\.safetensors: coef has shape None"),
])
def test_a_malformed_lexical_model_is_a_bundle_error_naming_the_file(fusion_bundle, tmp_path, file, write, message):
    from anime_udf.bundle import file_sha256

    bundle = shutil.copytree(fusion_bundle, tmp_path / "fusion")
    write(bundle)
    _edit_manifest(bundle, lambda m: m["files"].__setitem__(file, file_sha256(bundle / file)))
    with pytest.raises(BundleError, match=message):
        load_scorer(bundle)


def test_encoder_weights_holding_nan_are_refused_naming_the_file(tiny_distilbert, tmp_path):
    from anime_udf.text import EncoderError, FrozenTextEncoder

    encoder = shutil.copytree(tiny_distilbert, tmp_path / "encoder")
    from safetensors.torch import load_file, save_file

    state = load_file(str(encoder / "model.safetensors"))
    _poison("transformer.layer.0.ffn.lin1.weight", float("nan"))(state)
    save_file(state, str(encoder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(EncoderError, match=r"encoder: weights 'transformer\.layer\.0\.ffn\.lin1\.weight' "
                                           r"\(model\.safetensors\) hold NaN or infinite values"):
        FrozenTextEncoder(encoder, cache=None, device="cpu", precision="fp32").embed(["A story."])
