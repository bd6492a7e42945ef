"""A missing, truncated or inconsistent bundle gives one clear error naming the file."""

import json
import shutil

import pytest

from anime_udf.bundle import BundleError, read_manifest, write_bundle
from anime_udf.scoring import load_scorer


@pytest.fixture
def bundle(baseline_bundle, tmp_path):
    return shutil.copytree(baseline_bundle, tmp_path / "copy")


def test_bundle_is_safetensors_and_json_only(baseline_bundle):
    names = sorted(p.name for p in baseline_bundle.iterdir())
    assert names == ["manifest.json", "model.safetensors"]
    manifest = read_manifest(baseline_bundle)
    assert manifest["kind"] == "baseline" and manifest["metrics"]["valid"]["n"] == 80
    assert manifest["training"]["data_fingerprint"].startswith("sha256:")


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
