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
