"""The fusion model's lexical view: the same scores as scikit-learn, out-of-fold while
training, and a bundle part that is JSON + safetensors and never unpickled."""

import json
import pickle
import re
import unicodedata

import duckdb
import numpy as np
import polars as pl
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold

import anime_udf
from anime_udf.bundle import BundleError, file_sha256, read_manifest
from anime_udf.catalog import read_catalog
from anime_udf.features import clean_text
from anime_udf.bundle import LEXICAL_VOCABULARY_FILE as VOCABULARY_FILE
from anime_udf.bundle import LEXICAL_WEIGHTS_FILE as WEIGHTS_FILE
from anime_udf.lexical import TOKEN_PATTERN, LexicalModel, lower_tokens
from anime_udf.scoring import load_scorer
from tests.conftest import CATALOG, HOLDOUT
from training.lexical import LexicalSettings, fit_lexical, out_of_fold

INPUTS = ("synopsis", "genres", "studio", "episodes")
ODD_TEXTS = [None, "", "   ", "Ünïcode ÄCTION café — naïve ½ 東京 mecha!", "a b c", "war war war war. WAR"]


@pytest.fixture(scope="module")
def corpus():
    df = pl.read_csv(CATALOG)
    texts = [clean_text(t) for t in df["synopsis"].to_list()]
    y = ((df["score"].to_numpy() - df["score"].mean()) / df["score"].std()).astype(np.float32)
    return texts, y


def test_numpy_transform_scores_like_scikit_learn(corpus):
    texts, y = corpus
    model = fit_lexical(texts, y, LexicalSettings())
    reference = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    ridge = Ridge(alpha=1.0).fit(reference.fit_transform(texts), y)
    others = pl.read_csv(HOLDOUT)["synopsis"].to_list() + ODD_TEXTS
    expected = ridge.predict(reference.transform([t or "" for t in others]))
    np.testing.assert_allclose(model.predict(others), expected, atol=1e-6)
    assert model.predict([None])[0] == pytest.approx(ridge.intercept_, abs=1e-6)


def test_out_of_fold_scores_are_not_in_sample(corpus):
    texts, y = corpus
    settings = LexicalSettings()
    oof = out_of_fold(texts, y, settings, seed=0)
    in_sample = fit_lexical(texts, y, settings).predict(texts)
    rmse = lambda p: float(np.sqrt(np.mean((p - y) ** 2)))  # noqa: E731
    # In-sample scores flatter the ridge (on real synopses, ~80k n-gram weights nearly memorise
    # the targets); held-out scores are as good as they will be on new rows.
    assert rmse(in_sample) < 0.9 * rmse(oof)
    assert not np.allclose(oof, in_sample, atol=0.05)
    # A fold's scores are those of a model fitted on the other folds only.
    fit_rows, held_rows = next(KFold(n_splits=5, shuffle=True, random_state=0).split(texts))
    other_folds = fit_lexical([texts[i] for i in fit_rows], y[fit_rows], settings)
    np.testing.assert_allclose(oof[held_rows], other_folds.predict([texts[i] for i in held_rows]), rtol=0, atol=1e-9)


def test_fusion_bundle_round_trip_scores_identically_through_sql(fusion_bundle):
    manifest = read_manifest(fusion_bundle)
    lexical = manifest["lexical"]
    assert lexical["out_of_fold"] and lexical["folds"] == 5 and lexical["ngram_max"] == 2
    assert {VOCABULARY_FILE, WEIGHTS_FILE} <= set(manifest["files"])
    assert not manifest["text_model"]["in_bundle"]  # the frozen packaged encoder: referenced, not copied
    holdout = read_catalog(HOLDOUT).sort("anime_id")
    direct = load_scorer(fusion_bundle).predict(*(holdout[c].to_list() for c in INPUTS))
    con = duckdb.connect()
    anime_udf.register(con, fusion=fusion_bundle)
    con.register("holdout", holdout)
    sql = con.sql("SELECT predict_score_fusion(synopsis, genres, studio, episodes) AS p FROM holdout "
                  "ORDER BY anime_id").pl()["p"].to_numpy()
    again = load_scorer(fusion_bundle).predict(*(holdout[c].to_list() for c in INPUTS))
    np.testing.assert_allclose(sql, direct, atol=1e-9)
    np.testing.assert_array_equal(direct, again)  # the same cache entries: bit for bit


class Planted:
    """Unpickling this writes a marker file: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _relist(bundle, name):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name] = file_sha256(bundle / name)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_a_planted_pickle_among_the_lexical_files_is_never_loaded(fusion_bundle, tmp_path):
    import shutil

    bundle = shutil.copytree(fusion_bundle, tmp_path / "bundle")
    marker = tmp_path / "pickle-was-loaded"
    (bundle / "lexical" / "model.pkl").write_bytes(pickle.dumps(Planted(marker)))
    _relist(bundle, "lexical/model.pkl")
    assert load_scorer(bundle).predict(["A war story."], ["Drama"], [None], [12])[0] >= 1
    # The weights file itself swapped for a pickle (checksum updated): refused, not unpickled.
    (bundle / WEIGHTS_FILE).write_bytes(pickle.dumps({"idf": Planted(marker)}))
    _relist(bundle, WEIGHTS_FILE)
    with pytest.raises(BundleError, match=r"lexical/weights\.safetensors: cannot load weights"):
        load_scorer(bundle)
    assert not marker.exists()


def test_tokens_are_pythons_on_every_assigned_character():
    """Scoring finds tokens with polars (Rust regex), training with scikit-learn (Python's re):
    the same on every character Python's Unicode database assigns, and on case rules such as
    the final sigma and the dotted capital I."""
    chars = [chr(c) for c in range(0x20, 0x32000)
             if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn"]
    texts = [c + c for c in chars] + [a + " " + a + "x" for a in chars[::7]] + [t for t in ODD_TEXTS if t] + [
        "ΟΔΟΣ ΑΣ", "İstanbul", "cafe\u0301 naïve ½x", "a‿b foo_bar", "x\u200dy", "Ⓐⓑ ⅫⅫ", "ß ẞẞ ǅǅ ﬁﬂ K Å"]
    expected = [re.findall(TOKEN_PATTERN, t.lower()) for t in texts]
    assert lower_tokens(texts).to_list() == expected
    assert lower_tokens([None]).to_list() == [None]


def test_an_ngram_counts_when_its_words_are_not_terms_themselves():
    model = LexicalModel(["ab cd", "cd"], idf=np.array([1.0, 2.0]), coef=np.array([1.0, 3.0]), intercept=0.5,
                         ngram_max=2)
    # grams of "AB cd ab": ab, cd, ab, "ab cd", "cd ab" -> terms "ab cd" (once) and "cd" (once)
    weights = np.array([1.0, 2.0])
    expected = 0.5 + (weights @ np.array([1.0, 3.0])) / np.linalg.norm(weights)
    assert model.predict(["AB cd ab", "ab", None])[0] == pytest.approx(expected, abs=1e-6)
    np.testing.assert_allclose(model.predict(["AB cd ab", "ab", None])[1:], [0.5, 0.5])
