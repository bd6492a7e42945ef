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
