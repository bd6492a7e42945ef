"""Reading catalogs: odd column types and file names get clear errors or the obvious meaning."""

import polars as pl
import pytest

from anime_udf.catalog import CatalogError, read_catalog

ROW = {"synopsis": ["A story."], "studio": ["Studio Kestrel"], "episodes": [12], "score": [7.5]}


def test_genres_as_a_list_are_read_as_names(tmp_path):
    path = tmp_path / "c.parquet"
    pl.DataFrame({**ROW, "genres": [["Action", "Drama"]]}).write_parquet(path)
    assert read_catalog(path)["genres"].to_list() == ["Action,Drama"]


@pytest.mark.parametrize("column, value, message", [
    ("studio", [{"name": "Kestrel"}], r"column 'studio' is Struct.*; expected text"),
    ("genres", [[1, 2]], r"column 'genres' is List\(Int64\); expected text \(or a list of names\)"),
    ("episodes", [True], r"column 'episodes' is Boolean; expected numbers"),
])
def test_nested_and_boolean_columns_are_clear_errors(tmp_path, column, value, message):
    path = tmp_path / "c.parquet"
    pl.DataFrame({"genres": ["Action"], **ROW, column: value}).write_parquet(path)
    with pytest.raises(CatalogError, match=message):
        read_catalog(path)


def test_file_names_are_literal_not_glob_patterns(tmp_path):
    (tmp_path / "g").mkdir()
    row = "synopsis,genres,studio,episodes,score\nA story.,Action,S,12,7.5\n"
    (tmp_path / "g" / "a.csv").write_text(row)
    (tmp_path / "g" / "b.csv").write_text(row)
    (tmp_path / "g" / "*.csv").write_text(row)
    assert read_catalog(tmp_path / "g" / "*.csv").height == 1
    (tmp_path / "br[1].csv").write_text(row)
    assert read_catalog(tmp_path / "br[1].csv").height == 1


def test_infinite_and_huge_episodes_follow_one_rule_in_files_and_in_sql(tmp_path, baseline_bundle):
    import duckdb

    import anime_udf

    path = tmp_path / "c.csv"
    path.write_text("synopsis,genres,studio,episodes,score\n" + "".join(
        f"A story.,Action,S,{e},7\n" for e in ("inf", "-inf", "1e30", "12")))
    assert read_catalog(path)["episodes"].to_list() == [None, None, 2**62, 12]
    con = duckdb.connect()
    anime_udf.register(con, baseline=baseline_bundle)
    con.register("rows", read_catalog(path))
    from_file = [r[0] for r in con.sql("SELECT predict_score(synopsis, genres, studio, episodes) FROM rows").fetchall()]
    in_sql = [r[0] for r in con.sql(
        "SELECT predict_score('A story.', 'Action', 'S', e) FROM (VALUES (1, 'inf'::DOUBLE), (2, '-inf'::DOUBLE), "
        "(3, 1e30), (4, 12)) t(i, e) ORDER BY i").fetchall()]
    missing = con.sql("SELECT predict_score('A story.', 'Action', 'S', NULL)").fetchall()[0][0]
    assert from_file == pytest.approx(in_sql, abs=1e-9)
    assert from_file[0] == from_file[1] == pytest.approx(missing)



@pytest.mark.parametrize("episodes", ["2.5", "0.001", "-0.5", "1e-3"])
def test_a_count_with_a_fraction_is_missing_in_files_and_in_sql(tmp_path, baseline_bundle, episodes):
    """One input rule: an episode count with a fraction is a missing value wherever it enters (a
    NULL from the reader, the NULL's score from the SQL functions), never an error that stops a
    file or a query; the same count written whole (3.0) is a count everywhere."""
    import duckdb

    import anime_udf

    path = tmp_path / "c.csv"
    path.write_text(f"synopsis,genres,studio,episodes,score\nA story.,Action,S,3.0,7\nA story.,Action,S,{episodes},7\n")
    assert read_catalog(path)["episodes"].to_list() == [3, None]
    con = duckdb.connect()
    anime_udf.register(con, baseline=baseline_bundle)
    fraction, missing, whole, count = con.sql(
        f"SELECT predict_score('A story.', 'Action', 'S', {episodes}::DOUBLE), predict_score('A story.', 'Action', 'S', NULL), "
        "predict_score('A story.', 'Action', 'S', 3.0), predict_score('A story.', 'Action', 'S', 3)").fetchall()[0]
    assert fraction == pytest.approx(missing, abs=1e-5) and whole == pytest.approx(count, abs=1e-5)
    assert abs(count - missing) > 1e-3  # the count is read, the fraction is not
