"""Property-based: whatever a row holds, both SQL functions give a finite score in [1, 10],
the same one it gets when scored alone (DESIGN.md, "SQL functions")."""

import math

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import anime_udf

FUNCTIONS = {"baseline": "predict_score", "fusion": "predict_score_fusion"}
ROWS_PER_EXAMPLE = 125
EXAMPLES = 16  # 2,000 generated rows a run, through both functions

ONE_MEGABYTE = "mecha war " * 100_000  # the first row of every example
synopses = st.one_of(st.none(), st.text(max_size=300), st.sampled_from(["", "   \n\t"]))
genre_names = st.sampled_from(["Action", " drama ", "SCI-FI", "Slice of Life", "nope", "", ",", "Ünïcode"])
genres = st.one_of(st.none(), st.text(max_size=40), st.lists(genre_names, max_size=6).map(",".join))
studios = st.one_of(st.none(), st.text(max_size=40), st.sampled_from(["Studio Kestrel", " studio kestrel ", ""]))
episodes = st.one_of(st.none(), st.sampled_from([0.0, -1.0, -1e300, 1e300, math.nan, math.inf, -math.inf]),
                     st.integers(-10**12, 10**12).map(float), st.floats(allow_nan=True, allow_infinity=True))
rows = st.tuples(synopses, genres, studios, episodes)


def register_batch(cur: duckdb.DuckDBPyConnection, batch: list[tuple]) -> None:
    """Generated rows as the table ``batch`` (``i`` keeps their order), with the functions' input types."""
    columns = list(zip(*batch))
    cur.register("batch", pa.table({
        "i": list(range(len(batch))), "synopsis": pa.array(columns[0], pa.string()),
        "genres": pa.array(columns[1], pa.string()), "studio": pa.array(columns[2], pa.string()),
        "episodes": pa.array(columns[3], pa.float64())}))


@pytest.fixture(scope="module")
def con(baseline_bundle, fusion_bundle):
    con = duckdb.connect()
    anime_udf.register(con, baseline=baseline_bundle, fusion=fusion_bundle)
    return con


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                                 HealthCheck.function_scoped_fixture])
@given(batch=st.lists(rows, min_size=ROWS_PER_EXAMPLE, max_size=ROWS_PER_EXAMPLE))
def test_every_row_scores_in_range_and_as_it_does_alone(con, batch):
    batch[0] = (ONE_MEGABYTE, *batch[0][1:])
    cur = con.cursor()
    register_batch(cur, batch)
    for fn in FUNCTIONS.values():
        scored = cur.sql(f"SELECT {fn}(synopsis, genres, studio, episodes) AS p, "
                         f"{fn}(synopsis, 'Action', NULL, episodes) AS with_constants FROM batch ORDER BY i").fetchall()
        scores = np.array(scored, dtype=np.float64)
        assert np.isfinite(scores).all() and (scores >= 1).all() and (scores <= 10).all()
        for row, (together, with_constants) in zip(batch, scored):
            alone, alone_constants = cur.execute(
                f"SELECT {fn}($1, $2, $3, $4), {fn}($1, 'Action', NULL, $4)", list(row)).fetchall()[0]
            assert abs(alone - together) <= 1e-4
            assert abs(alone_constants - with_constants) <= 1e-4


# --- the rescoring's input hash (DESIGN.md, "NULL policy") -----------------------------------------

WHITESPACE = " \t\n\x0b\x0c\r\x1c\x1f\x85\xa0\u2003\u3000"  # what str.split() splits on, ASCII and not
words = st.text(alphabet=st.sampled_from("aAbBzZ-ÄäßK\u212a,." + WHITESPACE), max_size=12)
few_genres = st.lists(st.sampled_from(["Action", "action", " Drama", "sci-fi", "Sci  Fi", "Ächtung", ""]), max_size=4)
hash_rows = st.tuples(st.one_of(st.none(), words),
                      st.one_of(st.none(), words, few_genres.map(",".join)),
                      st.one_of(st.none(), words, st.sampled_from(["Gray Tide", "gray  tide", "GRAY\u3000TIDE"])),
                      st.one_of(st.none(), st.sampled_from([0.0, 2.0, 2.5, -1.0, 9_999.0, 10_000.0, 1e12, math.nan,
                                                            math.inf])))


def as_the_models_read(row: tuple) -> tuple:
    """What features.py makes of a row's four inputs: all any model reads."""
    from anime_udf.features import clean_text, log_episodes, parse_genres, studio_key

    synopsis, genres, studio, episodes = row
    return clean_text(synopsis), frozenset(parse_genres(genres)), studio_key(studio), log_episodes(episodes)


def respelled(row: tuple, data) -> tuple:
    """The row with what no model reads changed: the genres' order, repeats, ASCII case and the
    whitespace around them, the studio's ASCII case and whitespace runs, a count above the cap."""
    synopsis, genres, studio, episodes = row
    space = data.draw(st.sampled_from(WHITESPACE))
    if genres is not None:
        names = data.draw(st.permutations(genres.split(",") * 2))
        genres = ",".join(space + n.strip().swapcase() if n.isascii() else n for n in names) + space
    if studio is not None:
        studio = space + space.join(s.upper() if s.isascii() else s for s in studio.split())
    if episodes is not None and math.isfinite(episodes) and episodes > 10_000:
        episodes = 1e6
    return synopsis, genres, studio, episodes


@pytest.fixture(scope="module")
def hashing(con):
    """``con`` with sql/rescore.sql's macros."""
    from anime_udf.rescore.sql import sql_sections

    con.execute(sql_sections()["macros"])
    return con


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=hash_rows, other=hash_rows, data=st.data())
def test_rows_hash_alike_exactly_when_the_models_read_them_alike(hashing, a, other, data):
    """Rows that hash alike are scored alike by both models (a stored score is never reused for a
    row a model would score otherwise); a row respelled in what no model reads hashes as it did (a
    store is not rescored for it). The synopsis's whitespace runs are the one exception: no
    model reads them, but they hash apart."""
    cur = hashing

    def h(row):
        return cur.execute("SELECT rescore_input_hash(?, ?, ?, ?)", list(row)).fetchall()[0][0]

    again = respelled(a, data)
    assert as_the_models_read(again) == as_the_models_read(a)  # a respelling the models ignore
    assert h(again) == h(a)
    b = data.draw(st.sampled_from([other, again, (other[0], *again[1:])]))
    if h(a) == h(b):
        assert as_the_models_read(a) == as_the_models_read(b)
        for fn in FUNCTIONS.values():
            (score_a,), (score_b,) = (cur.execute(f"SELECT {fn}(?, ?, ?, ?)", list(r)).fetchall()[0] for r in (a, b))
            assert score_a == score_b
    elif as_the_models_read(a) == as_the_models_read(b):  # the exception, and only it
        assert a[0] != b[0] and h((a[0], *b[1:])) == h(a)
