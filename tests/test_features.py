import numpy as np
import pytest

from anime_udf.bundle import read_manifest
from anime_udf.features import TabularEncoder, clean_text, log_episodes, parse_genres


def test_genres_ignore_case_spaces_and_empty_names():
    assert parse_genres(" Action ,sci-FI,, Slice of Life ") == ["action", "sci-fi", "slice of life"]
    assert parse_genres(None) == []


def test_null_synopsis_is_empty_text_and_whitespace_collapses():
    assert clean_text(None) == ""
    assert clean_text("  two\n\twords ") == "two words"


@pytest.mark.parametrize("value", [None, -1, -0.5, float("nan"), "many"])
def test_missing_episodes(value):
    assert log_episodes(value) is None


def test_huge_episodes_are_capped():
    assert log_episodes(10**15) == log_episodes(10**6)


def test_encoder_policy():
    enc = TabularEncoder.fit(["Action,Drama", "Comedy", None], ["Kestrel", "kestrel ", "Solo"], [12, 24, None])
    assert enc.genres == ("action", "comedy", "drama")
    assert enc.studios == ("kestrel",)  # "Solo" is seen once: below min count, so unknown
    dense, studio = enc.encode(["DRAMA, unknown-genre", None], ["KESTREL", None], [-3, 12])
    assert dense[0, 1] == 1.0 and dense[0, 0] == 0.0  # negative episodes: missing flag, imputed at mean
    assert dense[0, 2:].tolist() == [0.0, 0.0, 1.0]
    assert dense[1, 2:].tolist() == [0.0, 0.0, 0.0]
    assert studio.tolist() == [1, 0]


def test_encoder_round_trips_through_a_bundle(baseline_bundle):
    manifest = read_manifest(baseline_bundle)
    enc = TabularEncoder.from_manifest(manifest["features"])
    assert enc.to_manifest() == manifest["features"]
    again = TabularEncoder.from_manifest(enc.to_manifest())
    rows = (["Drama,Kids", None], ["Studio Kestrel", "nobody"], [12, None])
    for a, b in zip(enc.encode(*rows), again.encode(*rows)):
        np.testing.assert_array_equal(a, b)
    assert "drama" in enc.genres and "studio kestrel" in enc.studios
