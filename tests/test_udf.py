"""The SQL functions' contracts (DESIGN.md, "SQL functions")."""

import math
import shutil
import threading

import duckdb
import numpy as np
import polars as pl
import pytest

import anime_udf
from anime_udf.catalog import read_catalog
from anime_udf.scoring import load_scorer
from anime_udf.udf import NoModelsError
from tests.conftest import CATALOG

FUNCTIONS = {"baseline": "predict_score", "fusion": "predict_score_fusion"}


@pytest.fixture
def fn(kind) -> str:
    return FUNCTIONS[kind]


@pytest.fixture
def con(kind, bundle):
    con = duckdb.connect()
    anime_udf.register(con, **{kind: bundle})
    con.register("catalog", read_catalog(CATALOG))
    con.execute("CREATE TABLE anime AS SELECT * FROM catalog")  # a real table: visible from other cursors
    return con


def test_udf_equals_direct_python_scoring(con, bundle, fn):
    sql = con.sql(f"SELECT {fn}(synopsis, genres, studio, episodes) AS p FROM anime ORDER BY anime_id").pl()["p"]
    df = read_catalog(CATALOG).sort("anime_id")
    direct = load_scorer(bundle).predict(*(df[c].to_list() for c in ("synopsis", "genres", "studio", "episodes")))
    np.testing.assert_allclose(sql.to_numpy(), direct, atol=1e-9)
    assert sql.dtype == pl.Float64


EDGE_ROWS = [
    (None, None, None, None),
    ("", "", "", 0),
    ("   \n\t ", "  ,  , ", "   ", -5),
    ("A quiet story.", "NotAGenre, ALSO-NOT", "Totally Unknown Studio", 10**12),
    ("x" * 20_000, " action ,DRAMA", "studio kestrel", float("nan")),
]


def test_missing_and_odd_inputs_give_finite_scores_in_range(con, fn):
    con.execute("CREATE TABLE edge (synopsis VARCHAR, genres VARCHAR, studio VARCHAR, episodes DOUBLE)")
    con.executemany("INSERT INTO edge VALUES (?, ?, ?, ?)", EDGE_ROWS)
    scores = [r[0] for r in con.execute(f"SELECT {fn}(synopsis, genres, studio, episodes) FROM edge").fetchall()]
    assert len(scores) == len(EDGE_ROWS)
    assert all(s is not None and math.isfinite(s) and 1.0 <= s <= 10.0 for s in scores)


def test_case_and_spaces_in_genres_do_not_matter(con, fn):
    a, b = con.execute(
        f"SELECT {fn}('A story.', 'Drama,Mystery', 'Studio Kestrel', 12),"
        f"       {fn}('A story.', '  drama , MYSTERY ', ' studio kestrel', 12)").fetchall()[0]
    assert a == b


def test_row_score_does_not_depend_on_its_batch(con, fn):
    call = f"{fn}(synopsis, genres, studio, episodes)"
    alone = con.execute(f"SELECT {call} FROM anime WHERE anime_id = 17").fetchall()[0][0]
    big = con.sql(
        f"SELECT anime_id, {call} AS p FROM (SELECT * FROM anime, range(13)) ORDER BY random() LIMIT 5000"
    ).pl()
    assert big.height == 5000
    scores = big.filter(pl.col("anime_id") == 17)["p"].to_numpy()
    assert len(scores) > 0
    assert np.max(np.abs(scores - alone)) <= 1e-5


def test_constant_arguments_are_scored_per_row(con, fn):
    rows = con.sql(f"SELECT {fn}('A story of war.', 'Action', NULL, 12) AS p FROM range(5000)").pl()
    assert rows.height == 5000 and rows["p"].null_count() == 0
    assert rows["p"].n_unique() == 1
    mixed = con.sql(f"SELECT {fn}(synopsis, 'Action', NULL, 12) AS p FROM anime").pl()
    assert mixed["p"].n_unique() > 1  # the varying column still varies


def test_safe_from_several_threads(con, fn):
    call = f"{fn}(synopsis, genres, studio, episodes)"
    expected = con.sql(f"SELECT anime_id, {call} AS p FROM anime ORDER BY anime_id").pl()
    results, errors = [], []

    def work():
        try:
            c = con.cursor()
            results.append(c.sql(f"SELECT anime_id, {call} AS p FROM anime ORDER BY anime_id").pl())
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results:
        np.testing.assert_allclose(r["p"].to_numpy(), expected["p"].to_numpy(), atol=1e-5)


def test_register_finds_newest_bundle_in_models_dir(baseline_bundle, tmp_path, monkeypatch):
    con = duckdb.connect()
    with pytest.raises(NoModelsError, match="anime-udf train baseline"):
        anime_udf.register(con)
    shutil.copytree(baseline_bundle, tmp_path / "models" / "b1")
    assert list(anime_udf.register(con)) == ["predict_score"]
    assert con.execute("SELECT predict_score('x', NULL, NULL, NULL)").fetchall()[0][0] > 0


@pytest.mark.parametrize("damage", ["corrupt", "read-only"])
def test_an_unusable_embedding_cache_is_a_warning_not_an_error(baseline_bundle, tmp_path, monkeypatch, damage):
    import os
    import sqlite3
    import stat

    def read_only_database(*args, **kwargs):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    if damage == "corrupt":
        (cache_dir / "embeddings.sqlite").write_bytes(b"this is not a database" * 100)
    else:
        cache_dir.chmod(stat.S_IREAD | stat.S_IEXEC)
        if os.geteuid() == 0:  # root writes anyway: make SQLite answer as it does for other users
            monkeypatch.setattr(sqlite3, "connect", read_only_database)
    monkeypatch.setenv("ANIME_UDF_CACHE", str(cache_dir))
    with pytest.warns(RuntimeWarning, match="cannot be used .*continuing without it"):
        scores = load_scorer(baseline_bundle).predict(["A war story."], ["Drama"], [None], [12])
    assert 1 <= scores[0] <= 10
    cache_dir.chmod(stat.S_IRWXU)
