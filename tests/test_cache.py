"""The embedding cache: keyed on everything that makes an embedding, checked on read, private."""

import json
import sqlite3

import numpy as np
import pytest

from anime_udf.cache import EmbeddingCache, text_key
from anime_udf.text import FrozenTextEncoder, default_encoder_path
from tests.conftest import assert_fp32_close

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
    assert_fp32_close(real.embed(TEXTS), reference)  # not the one-layer vectors just cached
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
        assert_fp32_close(real.embed(TEXTS), reference)
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
        assert_fp32_close(encoder(cache).embed(TEXTS), reference)
    assert list(shared.iterdir()) == [] and victim.read_text() == "my notes"


def cache_command(tmp_path, *args):
    from click.testing import CliRunner

    from anime_udf.cli import cli

    return CliRunner().invoke(cli, ["cache", *args], env={"ANIME_UDF_CACHE": str(tmp_path)})


def test_cache_command_lists_entries_per_encoder_and_prunes_one(tmp_path, reference):
    cache = EmbeddingCache(tmp_path / "embeddings.sqlite")
    fp32 = encoder(cache)
    fp32.embed(TEXTS)
    other = encoder(cache, variant(tmp_path, "one-layer", edit_json("config.json", num_hidden_layers=1)))
    other.embed(TEXTS[:2])
    listed = json.loads(cache_command(tmp_path, "info", "--json").output)
    assert {e["encoder"]: e["entries"] for e in listed["encoders"]} == {fp32.encoder_id: 3, other.encoder_id: 2}
    assert listed["bytes"] == cache.size_bytes() > 0
    assert "5 entries, 2 encoder(s)" in cache_command(tmp_path).output  # the default: info

    dry = cache_command(tmp_path, "prune", "--encoder", other.encoder_id, "--dry-run")
    assert dry.exit_code == 0 and "would remove 2 entries" in dry.output
    pruned = cache_command(tmp_path, "prune", "--encoder", other.encoder_id)
    assert pruned.exit_code == 0 and "removed 2 entries" in pruned.output
    assert {e["encoder"] for e in cache.stats()} == {fp32.encoder_id}
    assert_fp32_close(fp32.embed(TEXTS), reference)  # the other encoder's entries only


def test_prune_older_than_removes_old_and_undated_entries_and_shrinks_the_file(tmp_path, reference):
    path = tmp_path / "embeddings.sqlite"
    with sqlite3.connect(path) as con:  # a cache written before entries were dated
        con.execute("CREATE TABLE embeddings (encoder TEXT NOT NULL, key TEXT NOT NULL, vector BLOB NOT NULL, "
                    "PRIMARY KEY (encoder, key)) WITHOUT ROWID")
        con.executemany("INSERT INTO embeddings VALUES ('old-encoder', ?, ?)",
                        [(f"{i:064x}", np.ones(384, np.float32).tobytes()) for i in range(2000)])
    con.close()
    path.chmod(0o600)
    cache = EmbeddingCache(path)
    assert cache.usable
    real = encoder(cache)
    real.embed(TEXTS)  # dated now
    with sqlite3.connect(path) as con:  # one entry written 40 days ago
        con.execute("UPDATE embeddings SET written_at = written_at - 40 * 86400 WHERE key = ?", [text_key(TEXTS[0])])
    con.close()
    before = cache.size_bytes()
    result = cache_command(tmp_path, "prune", "--older-than", "30d")
    assert result.exit_code == 0, result.output
    assert "removed 2,001 entries" in result.output
    assert {e["encoder"]: e["entries"] for e in cache.stats()} == {real.encoder_id: 2}
    assert cache.size_bytes() < before / 2
    assert_fp32_close(real.embed(TEXTS), reference)
    with sqlite3.connect(path) as con:  # rewritten in the layout without overflow pages
        assert "WITHOUT ROWID" not in con.execute("SELECT sql FROM sqlite_master WHERE name = 'embeddings'").fetchone()[0]
    con.close()

    assert "MB ->" in cache_command(tmp_path, "compact").output
    assert_fp32_close(real.embed(TEXTS), reference)
    assert cache_command(tmp_path, "prune").exit_code == 2  # nothing said: refused
    assert "is not an age" in cache_command(tmp_path, "prune", "--older-than", "soon").output


def test_the_cache_command_on_an_unusable_cache_says_why_and_fails(tmp_path):
    (tmp_path / "embeddings.sqlite").write_bytes(b"not a database, and long enough to be read as one" * 100)
    for args in (["info"], ["prune", "--older-than", "1d"], ["compact"]):
        result = cache_command(tmp_path, *args)
        assert result.exit_code == 1, result.output
        assert f"embedding cache {tmp_path / 'embeddings.sqlite'} cannot be used (file is not a database)" \
            in result.output, result.output
        assert "Traceback" not in result.output


def test_pruning_a_read_only_cache_names_the_file_and_keeps_its_entries(tmp_path, monkeypatch):
    """SQLite opens a file its user may not write read-only; the tests run as root, which chmod
    does not stop, so the cache is opened read-only here as SQLite would open it."""
    path = tmp_path / "embeddings.sqlite"
    EmbeddingCache(path).put("an-encoder", {text_key(TEXTS[0]): np.ones(384, np.float32)})
    monkeypatch.setattr(EmbeddingCache, "_connect",
                        lambda self: sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=120))
    for args, done in ((["prune", "--older-than", "0s"], "pruned"), (["compact"], "compacted")):
        result = cache_command(tmp_path, *args)
        assert result.exit_code == 1, result.output
        assert result.output == (f"Error: embedding cache {path} is read-only, so it cannot be {done} "
                                 "(attempt to write a readonly database)\n")
    assert [e["entries"] for e in EmbeddingCache(path).stats()] == [1]
