"""The embedding cache: keyed on everything that makes an embedding, checked on read, private."""

import json
import sqlite3

import numpy as np
import pytest

from anime_udf.cache import EmbeddingCache, text_key
from anime_udf.text import FrozenTextEncoder, default_encoder_path

TEXTS = ["A boy finds a robot.", "Two sisters run a bakery in Kyoto.", "Space pirates, again."]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return FrozenTextEncoder(cache=None, device="cpu", precision="fp32").embed(TEXTS)


def encoder(cache, path=None) -> FrozenTextEncoder:
    return FrozenTextEncoder(path, cache=cache, device="cpu", precision="fp32")


def variant(tmp_path, name, edit):
    """The packaged encoder, its weights linked, one other file edited."""
    packaged = default_encoder_path()
    directory = tmp_path / name
    directory.mkdir()
    for file in packaged.iterdir():
        if file.is_file():
            (directory / file.name).symlink_to(file)
    edit(directory)
    return directory


def edit_json(name, **changes):
    def edit(directory):
        data = json.loads((directory / name).read_text())
        (directory / name).unlink()
        (directory / name).write_text(json.dumps(data | changes))
    return edit


def test_an_encoder_with_another_config_never_serves_the_real_one(tmp_path, reference):
    cache = EmbeddingCache(tmp_path / "embeddings.sqlite")
    one_layer = encoder(cache, variant(tmp_path, "one-layer", edit_json("config.json", num_hidden_layers=1)))
    real = encoder(cache)
    assert one_layer.checksum == real.checksum and one_layer.encoder_id != real.encoder_id
    assert not np.allclose(one_layer.embed(TEXTS), reference, atol=1e-3)
    np.testing.assert_array_equal(real.embed(TEXTS), reference)  # not the one-layer vectors just cached
    other_tokenizer = encoder(cache, variant(tmp_path, "cased", edit_json("tokenizer_config.json",
                                                                           do_lower_case=False)))
    assert other_tokenizer.encoder_id != real.encoder_id and real.encoder_id.endswith("|fp32")


def plant(cache, encoder_id, text, vector) -> None:
    with sqlite3.connect(cache.path) as con:
        con.execute("UPDATE embeddings SET vector = ? WHERE encoder = ? AND key = ?",
                    (vector, encoder_id, text_key(text)))
    con.close()


def test_a_cached_vector_of_the_wrong_width_or_not_finite_is_computed_again(tmp_path, reference):
    cache = EmbeddingCache(tmp_path / "embeddings.sqlite")
    real = encoder(cache)
    real.embed(TEXTS)
    plant(cache, real.encoder_id, TEXTS[0], np.ones(10, np.float32).tobytes())
    plant(cache, real.encoder_id, TEXTS[1], np.full(384, np.nan, np.float32).tobytes())
    plant(cache, real.encoder_id, TEXTS[2], "not a vector")
    with pytest.warns(RuntimeWarning, match="3 vector.s. not of 384 finite numbers; computing them again"):
        np.testing.assert_array_equal(real.embed(TEXTS), reference)
    with sqlite3.connect(cache.path) as con:  # rewritten
        assert {len(v) for (v,) in con.execute("SELECT vector FROM embeddings")} == {384 * 4}
    con.close()


def test_a_cache_others_may_write_or_a_symlinked_one_is_not_used(tmp_path, reference):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    victim = tmp_path / "notes.txt"
    victim.write_text("my notes")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "embeddings.sqlite").symlink_to(victim)
    group_file = tmp_path / "group"
    group_file.mkdir(mode=0o700)
    EmbeddingCache(group_file / "embeddings.sqlite")
    (group_file / "embeddings.sqlite").chmod(0o664)
    for path, reason in [(shared / "embeddings.sqlite", "shared is writable by other users .mode 777."),
                         (private / "embeddings.sqlite", "is a symbolic link"),
                         (group_file / "embeddings.sqlite", "embeddings.sqlite is writable by other users")]:
        with pytest.warns(RuntimeWarning, match=f"{reason}.*continuing without it"):
            cache = EmbeddingCache(path)
        np.testing.assert_array_equal(encoder(cache).embed(TEXTS), reference)
    assert list(shared.iterdir()) == [] and victim.read_text() == "my notes"
