"""Nightly rescoring (anime_udf/rescore/, sql/rescore.sql): incremental, idempotent,
crash-safe under kill -9, exclusive between concurrent runs, and the SQL agrees."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from anime_udf.rescore import on_duckdb as rs
from anime_udf.catalog import read_catalog
from anime_udf.cli import cli
from anime_udf.sqlutil import quote_ident, quote_literal, sql_path
from anime_udf.errors import EXIT_BUSY, EXIT_USAGE
from anime_udf.rescore import RescoreError, StoreBusyError, model_id, rescore
from tests.conftest import ROOT, assert_fp32_close

CATALOG = Path(__file__).resolve().parents[1] / "fixtures" / "catalog.csv"
SCORE_COLUMNS = "key, model_id, model_kind, input_hash, score, imputed, run_id, scored_at"
CHANGED = (1, 2, 3, 4, 5)  # synopses edited in catalog B
REMOVED = (6, 7, 8)  # keys gone from catalog B
ADDED = (100001, 100002)  # new keys in catalog B


# --- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def second_head(tmp_path_factory, session_cache, baseline_bundle) -> Path:
    """Another baseline head on the same frozen encoder: its embeddings are all cached."""
    from anime_udf.cache import EmbeddingCache
    from training.baseline import BaselineSettings, train_baseline
    from training.common import load_split

    split = load_split(CATALOG)
    out = tmp_path_factory.mktemp("bundles2") / "baseline-head2"
    train_baseline(split, out, BaselineSettings(epochs=3, seed=7),
                   cache=EmbeddingCache(session_cache / "embeddings.sqlite"), progress=False, log=lambda _: None)
    return out


def catalog_a() -> pl.DataFrame:
    return read_catalog(CATALOG)


def catalog_b() -> pl.DataFrame:
    """Catalog A with 5 synopses edited, 3 rows gone and 2 new rows."""
    a = catalog_a()
    edited = a.with_columns(
        synopsis=pl.when(pl.col("anime_id").is_in(CHANGED))
        .then(pl.col("synopsis") + " Then a new season begins.")
        .otherwise(pl.col("synopsis"))
    ).filter(~pl.col("anime_id").is_in(REMOVED))
    added = a.head(2).with_columns(anime_id=pl.Series(ADDED), synopsis=pl.lit("A brand new show about rescoring."))
    return pl.concat([edited, added])


def write(df: pl.DataFrame, path: Path) -> Path:
    df.write_csv(path)
    return path


def snapshot(store: Path) -> dict:
    """Everything a run may change, read through a connection that is closed again."""
    con = duckdb.connect(str(store), read_only=True)
    try:
        return {
            "scores": con.execute(f"SELECT {SCORE_COLUMNS} FROM rescore_scores ORDER BY key, model_id").fetchall(),
            "runs": [r[0] for r in con.execute("SELECT run_id FROM rescore_runs ORDER BY finished_at, run_id").fetchall()],
        }
    finally:
        con.close()


def hashes(df: pl.DataFrame) -> dict[str, str]:
    """Expected input hashes of a catalog, from the SQL macros."""
    con = duckdb.connect()
    con.execute(rs.sql_sections()["macros"])
    con.register("c", df)
    rows = con.execute("SELECT CAST(anime_id AS VARCHAR), rescore_input_hash(synopsis, genres, studio, episodes) "
                       "FROM c").fetchall()
    con.close()
    return dict(rows)


def assert_store_matches(store: Path, df: pl.DataFrame, bundle: Path) -> None:
    """One row per catalog key for the model, none for other keys, with the catalog's hashes."""
    snap = snapshot(store)
    rows = [r for r in snap["scores"] if r[1] == model_id(bundle)]
    keys = [r[0] for r in rows]
    assert len(keys) == len(set(keys)) == df.height, "a row lost or duplicated"
    assert {r[0]: r[3] for r in rows} == hashes(df)
    assert all(1.0 <= r[4] <= 10.0 for r in rows)


def cli_subprocess(args: list[str], stderr_path: Path, **env) -> subprocess.Popen:
    command = [sys.executable, "-c", "from anime_udf.cli import cli; cli()", "rescore", *args]
    with open(stderr_path, "w") as err:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **env})


def wait_for(proc: subprocess.Popen, stderr_path: Path, marker: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker in stderr_path.read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before {marker!r}:\n{stderr_path.read_text()}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no {marker!r} within {timeout} s:\n{stderr_path.read_text()}")


# --- model ids, hashes, model choice ----------------------------------------------------------------


def test_model_id_is_a_content_hash(tmp_path, baseline_bundle, second_head):
    ident = model_id(baseline_bundle)
    assert ident.startswith("baseline-") and len(ident) == len("baseline-") + 12
    copy = shutil.copytree(baseline_bundle, tmp_path / "renamed")
    assert model_id(copy) == ident  # the same model under another name keeps its scores
    assert model_id(second_head) != ident  # a retrained head is a new model
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target"]["mean"] += 0.5  # scoring-relevant manifest content counts too
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert model_id(copy) != ident


def test_input_hash_tells_apart_exactly_what_the_model_does():
    con = duckdb.connect()
    con.execute(rs.sql_sections()["macros"])

    def h(*row):
        return con.execute("SELECT rescore_input_hash(?, ?, ?, ?)", list(row)).fetchall()[0][0]

    base = h("A story.", "Action", "Gray Tide", 12)
    assert base == h("A story.", "Action", "Gray Tide", 12.0)
    # The v1 hash is the one stores of schema versions 1 and 2 hold, as the releases before wrote it.
    assert con.execute("SELECT rescore_input_hash_v1('A story.', 'Action', 'Gray Tide', 12)").fetchall()[0][0] == (
        "f4db97a257a162f84b98de058d0b30b9b9aa4db78753d9bbb787e6917b72250a")
    # What the models normalise: the genres' case (ASCII), order, repeats and surrounding whitespace,
    # the studio's case (ASCII) and whitespace runs, counts from the cap (10,000) on.
    assert h("A story.", "Action, Comedy", "Gray Tide", 1) == h("A story.", " comedy,ACTION,action\t,", "gray \u3000tide ", 1)
    assert h("A story.", "Action", "Gray Tide", 10_000) == h("A story.", "Action", "Gray Tide", 1e12)
    # What they do not: a synopsis's case (a cased text encoder reads it), inner spaces of a genre
    # name; and what the hash leaves apart though no model reads it: a synopsis's whitespace runs,
    # non-ASCII case (rescored, to the same score).
    assert len({base, h("a story.", "Action", "Gray Tide", 12), h("A story.", "Sci  Fi", "Gray Tide", 12),
                h("A story.", "Sci Fi", "Gray Tide", 12), h("A story.", "Ächtung", "Gray Tide", 12),
                h("A story.", "ächtung", "Gray Tide", 12), h("A  story.", "Action", "Gray Tide", 12),
                h("A story.", "Action", "Gray Tide", 9_999)}) == 8
    # The hash knows no bundle: a genre or studio a bundle does not know still counts.
    assert h("A story.", "Action, Nope", "Gray Tide", 12) != base != h("A story.", "Action", "Nope Works", 12)
    # Missing values the model cannot tell apart: NULL and blank text; NULL, negative, fractional,
    # NaN and infinite episodes.
    assert h(None, None, None, None) == h("  ", "", "\t", -3)
    assert len({h("A story.", "Action", "Gray Tide", e) for e in (None, -3, 12.5, math.nan, math.inf)}) == 1
    # Anything else differs.
    assert len({base, h("A story!", "Action", "Gray Tide", 12), h("A story.", "Comedy", "Gray Tide", 12),
                h("A story.", "Action", "Pixel Mill", 12), h("A story.", "Action", "Gray Tide", 13),
                h("A story.", "Action", "Gray Tide", 0), h("A story.", "Action", "Gray Tide", None)}) == 7
    # The length-prefixed encoding cannot be fooled by text that looks like a field boundary.
    assert h("ab", "c", None, 1) != h("a", "bc", None, 1)
    assert h("aS1:b", None, None, 1) != h("a", "b", None, 1)
    rows = [("x", "Action", "S", 1), (" ", "Action", "S", 1), ("x", "Action", "S", -1), ("x", None, "S", 1),
            ("x", " , ", "S", 1), ("x", "Action", "S", 2.5)]
    con.register("rescore_catalog", pl.DataFrame([(i, *r) for i, r in enumerate(rows)], orient="row", schema={
        "key": pl.Int64, "synopsis": pl.Utf8, "genres": pl.Utf8, "studio": pl.Utf8, "episodes": pl.Float64}))
    con.execute(rs.sql_sections()["input"])
    read = con.execute("SELECT key, imputed, input_hash, v1_hash FROM rescore_input ORDER BY key::INTEGER").fetchall()
    assert [r[1] for r in read] == [False, True, True, True, True, True]
    assert [r[2] for r in read] == [h(*r) for r in rows]  # the section hashes as the macro does
    assert all(r[3] is None for r in read)  # no v1 hash where the store holds none


def test_model_choice(models, baseline_bundle, second_head, tmp_path):
    assert [c.path for c in rs.resolve_models("all", models)] == [models / baseline_bundle.name]
    assert rs.resolve_models(str(second_head), models)[0].model_id == model_id(second_head)
    with pytest.raises(RescoreError, match="no fusion bundle"):
        rs.resolve_models("fusion", models)
    with pytest.raises(RescoreError, match="no model bundles"):
        rs.resolve_models("all", tmp_path / "empty")
    with pytest.raises(RescoreError, match="two baseline bundles"):
        rs.resolve_models(["baseline", str(second_head)], models)


# --- incremental runs --------------------------------------------------------------------------------


def test_first_run_scores_all_and_second_run_nothing(tmp_path, models, baseline_bundle, monkeypatch, capsys):
    store = tmp_path / "scores.duckdb"
    first = rescore(write(catalog_a(), tmp_path / "a.csv"), store, progress=True)
    assert "scoring (baseline)" in capsys.readouterr().err  # the progress bar
    (m,) = first.models
    assert (first.rows_seen, m["rows_scored"], m["rows_reused"], m["rows_removed"]) == (400, 400, 0, 0)
    assert m["model_id"] == model_id(baseline_bundle) and m["rows_stored"] == 400
    assert m["score_p05"] <= m["score_p50"] <= m["score_p95"] and m["prev_run_id"] is None
    assert_store_matches(store, catalog_a(), baseline_bundle)
    before = snapshot(store)

    # Idempotence: nothing to score, so no model is even loaded, and the store's scores are untouched.
    import anime_udf.scoring

    monkeypatch.setattr(anime_udf.scoring, "load_scorer", lambda *a, **k: pytest.fail("loaded a model"))
    second = rescore(tmp_path / "a.csv", store)
    (m2,) = second.models
    assert (m2["rows_scored"], m2["rows_reused"], m2["rows_removed"]) == (0, 400, 0)
    assert m2["prev_run_id"] == first.run_id and m2["shift_mean"] == 0 and m2["shift_p50"] == 0
    after = snapshot(store)
    assert after["scores"] == before["scores"]
    assert after["runs"] == [first.run_id, second.run_id]

    # In a fresh process, such a run imports neither torch nor transformers (it starts in under a second).
    code = ("import sys\nfrom anime_udf.cli import cli\n"
            "try:\n    cli(['rescore', '--catalog', sys.argv[1], '--store', sys.argv[2]])\n"
            "except SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
            "assert not [m for m in ('torch', 'transformers') if m in sys.modules]\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.csv"), str(store)], check=True,
                   capture_output=True, env={**os.environ, "ANIME_UDF_MODELS": str(models)})


def test_changed_new_and_gone_rows(tmp_path, models, baseline_bundle):
    store = tmp_path / "scores.duckdb"
    first = rescore(write(catalog_a(), tmp_path / "a.csv"), store)
    old = {r[0]: r for r in snapshot(store)["scores"]}
    b = catalog_b()
    report = rescore(write(b, tmp_path / "b.csv"), store)
    (m,) = report.models
    assert report.rows_seen == 399
    assert (m["rows_scored"], m["rows_reused"], m["rows_removed"]) == (7, 392, 3)
    assert_store_matches(store, b, baseline_bundle)
    new = {r[0]: r for r in snapshot(store)["scores"]}
    rescored = {str(k) for k in (*CHANGED, *ADDED)}
    assert {k for k, r in new.items() if r[6] == report.run_id} == rescored
    assert all(new[k] == old[k] for k in new if k not in rescored)  # untouched, not rewritten
    # The new scores are what the model gives for the new inputs.
    from anime_udf.scoring import load_scorer

    rows = b.filter(pl.col("anime_id").is_in([*CHANGED, *ADDED])).sort("anime_id")
    expected = load_scorer(baseline_bundle).predict(*(rows[c].to_list() for c in ("synopsis", "genres", "studio", "episodes")))
    got = [new[str(k)][4] for k in rows["anime_id"]]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert first.catalog_fingerprint != report.catalog_fingerprint


def as_schema_version_2(store: Path, catalog: Path) -> None:
    """Rewrite a store as schema version 2 wrote it: each row's hash the v1 hash of its inputs."""
    con = duckdb.connect(str(store))
    con.execute(rs.sql_sections()["macros"])
    con.register("c", read_catalog(catalog))
    con.execute("UPDATE rescore_scores SET input_hash = rescore_input_hash_v1(synopsis, genres, studio, episodes) "
                "FROM c WHERE rescore_scores.key = CAST(c.anime_id AS VARCHAR)")
    con.execute("UPDATE rescore_meta SET value = '2' WHERE name = 'schema_version'")
    con.close()


def test_a_store_hashed_by_version_2_is_carried_over_without_rescoring(tmp_path, models):
    """A store of schema version 2 (v1 hashes) keeps every score whose inputs did not change, bit
    for bit: its next run scores only the edited rows and stores every row's new hash (version 3);
    from then on a respelling no model reads (genres' case, order and spaces, the studio's case)
    is no change, and a synopsis's whitespace runs are (the hash's one exception)."""
    store, catalog = tmp_path / "scores.duckdb", write(catalog_a(), tmp_path / "a.csv")
    rescore(catalog, store)
    unchanged_store = tmp_path / "unchanged.duckdb"
    as_schema_version_2(store, catalog)
    shutil.copy(store, unchanged_store)
    before = {r[0]: r for r in snapshot(store)["scores"]}

    (m,) = rescore(catalog, unchanged_store).models
    assert (m["rows_scored"], m["rows_reused"]) == (0, 400)
    after = {r[0]: r for r in snapshot(unchanged_store)["scores"]}
    assert {k: r[4] for k, r in after.items()} == {k: r[4] for k, r in before.items()}  # the same scores
    assert {k: r[3] for k, r in after.items()} == hashes(catalog_a())  # the new hashes

    edited = write(catalog_b(), tmp_path / "b.csv")
    run = rescore(edited, store)
    (m,) = run.models
    assert (m["rows_scored"], m["rows_reused"]) == (len(CHANGED) + len(ADDED), 392)
    after = {r[0]: r for r in snapshot(store)["scores"]}
    assert {k: r[3] for k, r in after.items()} == hashes(catalog_b())
    kept = [k for k in after if after[k][6] != run.run_id]
    assert len(kept) == 392 and all(after[k][4] == before[k][4] for k in kept)
    with duckdb.connect(str(store), read_only=True) as con:
        assert con.execute("SELECT value FROM rescore_meta WHERE name = 'schema_version'").fetchall() == [("3",)]

    respelled = catalog_b().with_columns(genres=pl.col("genres").str.to_uppercase().str.replace_all(",", " ,  "),
                                         studio=pl.col("studio").str.to_lowercase())
    (m,) = rescore(write(respelled, tmp_path / "c.csv"), store).models
    assert (m["rows_scored"], m["rows_reused"]) == (0, 399)
    spaced = respelled.with_columns(synopsis=pl.col("synopsis").str.replace(" ", "  "))
    (m,) = rescore(write(spaced, tmp_path / "d.csv"), store).models
    assert m["rows_scored"] == spaced["synopsis"].str.contains("  ").sum() > 0


def test_new_head_rescores_everything_without_encoding(tmp_path, models, baseline_bundle, second_head, monkeypatch):
    store = tmp_path / "scores.duckdb"
    first = rescore(write(catalog_a(), tmp_path / "a.csv"), store)
    from anime_udf.text import FrozenTextEncoder

    monkeypatch.setattr(FrozenTextEncoder, "_encode", lambda *a, **k: pytest.fail("re-encoded a synopsis"))
    report = rescore(tmp_path / "a.csv", store, models=str(second_head))
    (m,) = report.models
    assert (m["rows_scored"], m["rows_reused"], m["rows_superseded"]) == (400, 0, 400)
    assert m["prev_model_id"] == model_id(baseline_bundle) and m["model_id"] == model_id(second_head)
    assert m["shift_mean"] == pytest.approx(m["score_mean"] - first.models[0]["score_mean"])
    assert {r[1] for r in snapshot(store)["scores"]} == {model_id(second_head)}  # the old head's rows are gone
    assert_store_matches(store, catalog_a(), second_head)


def test_chunks_scored_two_at_once_give_each_row_its_own_score(tmp_path, baseline_bundle, fusion_bundle, warm_cache,
                                                              monkeypatch):
    """Chunks of 7 rows, two scored at once in threads, the models scoring different rows of each
    (the baseline scored the odd keys the night before): every row gets the score its model gives
    it alone. Where both models rescore the same rows, each synopsis is read from the cache once."""
    from anime_udf.cache import EmbeddingCache
    from anime_udf.scoring import load_scorer

    catalog, store = catalog_a(), tmp_path / "scores.duckdb"
    rescore(catalog.filter(pl.col("anime_id") % 2 == 1), store, models=str(baseline_bundle), chunk_rows=7)
    report = rescore(catalog, store, models=[str(baseline_bundle), str(fusion_bundle)], chunk_rows=7)
    assert [m["rows_scored"] for m in report.models] == [200, 400]
    scores = {(key, model): score for key, model, _, _, score, *_ in snapshot(store)["scores"]}
    columns = [catalog[c].to_list() for c in ("synopsis", "genres", "studio", "episodes")]
    for bundle in (baseline_bundle, fusion_bundle):
        alone = load_scorer(bundle).predict(*columns)  # from the embeddings the runs read
        assert_fp32_close([scores[(str(key), model_id(bundle))] for key in catalog["anime_id"]], alone)

    looked_up = []
    lookup = EmbeddingCache.lookup
    monkeypatch.setattr(EmbeddingCache, "lookup",
                        lambda self, encoder, keys, dim: looked_up.extend(keys) or lookup(self, encoder, keys, dim))
    report = rescore(catalog_b().filter(~pl.col("anime_id").is_in(ADDED)), store,
                     models=[str(baseline_bundle), str(fusion_bundle)], chunk_rows=7, allow_shrink=True)
    assert [m["rows_scored"] for m in report.models] == [len(CHANGED)] * 2
    assert len(looked_up) == len(CHANGED)  # once for both models


def test_missing_inputs_are_scored_and_counted(tmp_path, models, baseline_bundle):
    df = pl.DataFrame({
        "anime_id": [1, 2, 3, 4, 5, 6, 7, 8],
        "synopsis": ["A hero rises.", None, "   ", "A hero rises.", "A hero rises.", "A hero rises.", None, "Fine."],
        "genres": ["Action", "Action", "Action", None, "Action", "Action", None, "Drama"],
        "studio": ["Gray Tide", "Gray Tide", "Gray Tide", "Gray Tide", "", "Gray Tide", None, "Gray Tide"],
        "episodes": [12, 12, 12, 12, 12, -1, None, 24],
    })
    store = tmp_path / "scores.duckdb"
    report = rescore(df, store)
    assert report.rows_seen == 8 and report.rows_imputed == 6
    scores = {r[0]: r for r in snapshot(store)["scores"]}
    assert len(scores) == 8 and all(1.0 <= r[4] <= 10.0 for r in scores.values())
    assert [k for k, r in sorted(scores.items()) if r[5]] == ["2", "3", "4", "5", "6", "7"]
    # NULL and blank synopsis are the same input to the model: same hash, same score.
    assert scores["2"][3] == scores["3"][3] and scores["2"][4] == scores["3"][4]


def test_dry_run_scores_and_writes_nothing(tmp_path, models, monkeypatch):
    import anime_udf.scoring

    store = tmp_path / "scores.duckdb"
    with monkeypatch.context() as mp:
        mp.setattr(anime_udf.scoring, "load_scorer", lambda *a, **k: pytest.fail("loaded a model"))
        report = rescore(write(catalog_a(), tmp_path / "a.csv"), store, dry_run=True)
    assert report.status == "dry-run" and report.models[0]["rows_scored"] == 400
    assert not store.exists() and not rs.lock_path(store).exists()
    rescore(tmp_path / "a.csv", store)
    before = snapshot(store)
    with monkeypatch.context() as mp:
        mp.setattr(anime_udf.scoring, "load_scorer", lambda *a, **k: pytest.fail("loaded a model"))
        report = rescore(write(catalog_b(), tmp_path / "b.csv"), store, dry_run=True)
    (m,) = report.models
    assert (m["rows_scored"], m["rows_reused"], m["rows_removed"]) == (7, 392, 3)
    assert snapshot(store) == before


def test_key_errors(tmp_path, models):
    store = tmp_path / "scores.duckdb"
    a = catalog_a()
    with pytest.raises(RescoreError, match="no key column 'id'.*--key"):
        rescore(a, store, key="id")
    with pytest.raises(RescoreError, match="not unique: 1 occurs 2 times"):
        rescore(pl.concat([a, a.head(1)]), store)
    with pytest.raises(RescoreError, match="NULL in 1 row"):
        rescore(a.with_columns(anime_id=pl.when(pl.col("anime_id") == 3).then(None).otherwise(pl.col("anime_id"))),
                store)
    assert not store.exists()  # failed runs wrote nothing
    rescore(a, store)
    with pytest.raises(RescoreError, match="keys its rows by anime_id, not by title"):
        rescore(a, store, key="title")
    with pytest.raises(RescoreError, match="Parquet"):
        rescore(a, store, export=tmp_path / "scores.csv")


# --- CLI, export, SQL -------------------------------------------------------------------------------------


def test_cli_summary_json_export_and_failure(tmp_path, models):
    catalog = write(catalog_a(), tmp_path / "a.csv")
    runner = CliRunner()
    args = ["rescore", "--catalog", str(catalog), "--store", "scores.duckdb", "--export", "out/scores.parquet"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    for text in ("ok in", "400 rows", "scored", "first run of this kind", "export   out/scores.parquet: 400 rows"):
        assert text in result.output
    assert len(result.output.splitlines()) <= 24  # one screen

    exported = pl.read_parquet(tmp_path / "out" / "scores.parquet")
    assert exported.height == 400 and exported["anime_id"].dtype == pl.Int64
    assert set(exported.columns) >= {"anime_id", "model", "model_id", "score", "imputed_inputs", "up_to_date"}
    assert exported["up_to_date"].all()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scores.parquet"]  # no temporary left

    result = runner.invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["status"] == "ok" and record["models"][0]["rows_scored"] == 0
    assert record["models"][0]["rows_reused"] == 400 and record["export_rows"] == 400

    result = runner.invoke(cli, ["rescore", "--catalog", str(catalog), "--store", "scores.duckdb",
                                 "--key", "nope", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["status"] == "failed"
    assert "no key column 'nope'" in result.output

    result = runner.invoke(cli, ["rescore", "--catalog", str(catalog), "--store", "scores.duckdb", "--dry-run"])
    assert result.exit_code == 0 and "would score" in result.output and "dry run" in result.output


@pytest.mark.parametrize(("args", "names"), [
    (["--store", "s.duckdb"], "--catalog"),  # a required option missing: click's own error
    (["--catalog", "missing.csv", "--store", "s.duckdb"], "missing.csv: no such file"),
    (["--catalog", "{catalog}", "--store", "s.duckdb", "--wait", "soon"], "--wait"),
    (["--catalog", "{catalog}", "--store", "s", "--engine", "spark", "--export", "x.parquet"], "--export"),
])
def test_every_failure_of_rescore_json_is_json(tmp_path, args, names):
    """A scheduler reading --json reads every failure as JSON too, the earliest included, with the
    exit code of bad usage; nothing is created."""
    catalog = write(catalog_a(), tmp_path / "a.csv")
    result = CliRunner().invoke(cli, ["rescore", *(a.format(catalog=catalog) for a in args), "--json"])
    assert result.exit_code == EXIT_USAGE, result.output
    failed = json.loads(result.stdout)
    assert failed["status"] == "failed" and failed["exit_code"] == EXIT_USAGE and names in failed["error"]
    assert not (tmp_path / "s.duckdb").exists() and not (tmp_path / "s").exists()


def test_an_unforeseen_failure_of_rescore_json_is_json_too(tmp_path, models, monkeypatch):
    import anime_udf.rescore

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(anime_udf.rescore, "rescore", broken)
    catalog = write(catalog_a(), tmp_path / "a.csv")
    result = CliRunner().invoke(cli, ["rescore", "--catalog", str(catalog), "--store", "s.duckdb", "--json"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    failed = json.loads(result.stdout)
    assert failed == {"status": "failed", "exit_code": 1,
                      "error": "ZeroDivisionError: a bug (rerun with --debug for the traceback)"}


def test_unwritable_store_is_a_clear_error_also_under_json(tmp_path, models, monkeypatch):
    """A store that cannot be created fails naming the path and the reason, and --json
    prints the failure. The tests run as root, which chmod does not stop, so two failures
    root meets too: the store's directory under a regular file (mkdir fails), and the lock
    file's open failing with EACCES, as it does in a read-only directory (patched open)."""
    catalog = write(catalog_a(), tmp_path / "a.csv")

    def failure(store: Path) -> str:
        result = CliRunner().invoke(cli, ["rescore", "--catalog", str(catalog), "--store", str(store), "--json"])
        assert result.exit_code == 1, result.output
        failed = json.loads(result.stdout)
        assert failed["status"] == "failed" and failed["error"] in result.stderr
        return failed["error"]

    (tmp_path / "afile").write_text("")
    assert failure(tmp_path / "afile" / "scores.duckdb") == (
        f"{tmp_path / 'afile'}: cannot create the store's directory: it exists and is not a directory")

    store = tmp_path / "read-only" / "scores.duckdb"
    store.parent.mkdir()
    real_open = open

    def open_in_read_only_dir(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file) == rs.lock_path(store):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", open_in_read_only_dir)
    assert failure(store) == f"{rs.lock_path(store)}: cannot create or open the store's lock file: Permission denied"
    assert list(store.parent.iterdir()) == []


def test_key_named_like_an_export_column_is_refused_before_any_work(tmp_path, models, monkeypatch):
    """The export adds model, run_id, ...: a key column of that name would be exported
    under another name (DuckDB renames the clash to model_1), so the run is refused."""
    import anime_udf.scoring

    store, export = tmp_path / "scores.duckdb", tmp_path / "scores.parquet"
    with monkeypatch.context() as mp:
        mp.setattr(anime_udf.scoring, "load_scorer", lambda *a, **k: pytest.fail("scored before refusing"))
        for key, column in (("model", "model"), ("RUN_ID", "run_id")):
            df = catalog_a().rename({"anime_id": key})
            for dry_run in (False, True):
                with pytest.raises(RescoreError, match=rf"--key {key}: the export has a {column} column of its own"):
                    rescore(df, store, key=key, export=export, dry_run=dry_run)
    assert not store.exists() and not export.exists()
    # Without --export the key is only the store's key: no clash.
    assert rescore(catalog_a().rename({"anime_id": "model"}), store, key="model").models[0]["rows_scored"] == 400


def add_fusion_rows(store: Path, df: pl.DataFrame) -> None:
    """Fusion rows for the catalog's keys, as a fusion run would have written them
    (training a fusion model just to hold rows of another kind would cost minutes)."""
    con = duckdb.connect(str(store))
    try:
        con.register("h", pl.DataFrame(list(hashes(df).items()), schema=["key", "input_hash"], orient="row"))
        con.execute("INSERT OR REPLACE INTO rescore_scores BY NAME SELECT key, 'fusion-000000000000' AS model_id, "
                    "'fusion' AS model_kind, input_hash, 5.0 AS score, false AS imputed, 'an-earlier-run' AS run_id, "
                    "now() AS scored_at FROM h")
    finally:
        con.close()


def test_removed_keys_lose_the_rows_of_every_kind(tmp_path, models):
    """A key gone from the catalog has no score of any kind: a --model baseline run also
    deletes its fusion rows, and the shrink guard counts the keys of every kind."""
    store, few = tmp_path / "scores.duckdb", catalog_a().head(10)
    rescore(few, store)
    add_fusion_rows(store, catalog_a())  # fusion holds 390 keys that baseline does not
    before = snapshot(store)
    with pytest.raises(RescoreError, match="would remove 390 of the 400 keys"):
        rescore(few, store, models="baseline")
    assert snapshot(store) == before
    report = rescore(few, store, models="baseline", allow_shrink=True)
    assert report.models[0]["rows_removed"] == 390  # keys, whatever kinds held them
    kept = {str(k) for k in few["anime_id"]}
    rows = snapshot(store)["scores"]
    assert {r[0] for r in rows if r[2] == "fusion"} == {r[0] for r in rows if r[2] == "baseline"} == kept

    add_fusion_rows(store, catalog_a())  # within the limit: 3 of 400 keys gone, both kinds' rows
    rescore(catalog_a(), store, models="baseline")
    report = rescore(catalog_b(), store, models="baseline")
    assert report.models[0]["rows_removed"] == 3
    rows = snapshot(store)["scores"]
    assert not {r[0] for r in rows} & {str(k) for k in REMOVED}
    assert len([r for r in rows if r[2] == "fusion"]) == 397  # the fusion rows of the kept keys stay


def test_overlapping_paths_are_refused_before_anything_is_written(tmp_path, models):
    catalog, store = tmp_path / "a.parquet", tmp_path / "scores.parquet"  # a store may have any name
    catalog_a().write_parquet(catalog)
    rescore(catalog, store)
    before, catalog_bytes = snapshot(store), catalog.read_bytes()
    here = tmp_path.resolve()
    cases = [  # relative to the working directory, tmp_path: ./x and x are one file
        (["--catalog", "a.parquet", "--store", "new.duckdb", "--export", "./a.parquet"],
         f"--catalog and --export are the same file, {here / 'a.parquet'};"),
        (["--catalog", "a.parquet", "--store", "scores.parquet", "--export", "./scores.parquet"],
         f"--store and --export are the same file, {here / 'scores.parquet'};"),
        (["--catalog", "a.parquet", "--store", "./a.parquet"],
         f"--catalog and --store are the same file, {here / 'a.parquet'};"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, ["rescore", *args])
        assert result.exit_code == 1 and message in result.output, result.output
    (tmp_path / "wal.parquet").symlink_to(tmp_path / "scores.parquet.wal")  # resolved like any path
    with pytest.raises(RescoreError, match=r"--store and --export are the same file, .*scores\.parquet\.wal "
                                           r"\(the store's write-ahead log\)"):
        rescore(catalog, store, export=tmp_path / "wal.parquet")
    assert snapshot(store) == before and catalog.read_bytes() == catalog_bytes
    assert not (tmp_path / "new.duckdb").exists() and not (tmp_path / "scores.parquet.wal").exists()


def test_shrinking_catalog_is_refused_unless_allowed(tmp_path, models):
    """A header-only or cut-short catalog would delete the scores of every key it lacks."""
    store, export = tmp_path / "scores.duckdb", tmp_path / "scores.parquet"
    rescore(catalog_a(), store, export=export)
    before, exported = snapshot(store), export.read_bytes()
    args = ["rescore", "--catalog", str(write(catalog_a().clear(), tmp_path / "empty.csv")),
            "--store", str(store), "--export", str(export)]
    for dry_run in ([], ["--dry-run"]):  # a dry run says that the run would be refused
        result = CliRunner().invoke(cli, [*args, *dry_run])
        assert result.exit_code == 1, result.output
        assert "would remove 400 of the 400 keys" in result.output and "--allow-shrink" in result.output
    assert snapshot(store) == before and export.read_bytes() == exported
    with pytest.raises(RescoreError, match="would remove 201 of the 400 keys"):
        rescore(catalog_a().head(199), store)
    assert rescore(catalog_a().head(200), store).models[0]["rows_removed"] == 200  # half is not more than half
    result = CliRunner().invoke(cli, [*args, "--allow-shrink"])
    assert result.exit_code == 0, result.output
    assert snapshot(store)["scores"] == [] and pl.read_parquet(export).height == 0


def run_sql_script(store: Path, catalog: Path, bundle: Path, level: float | None = None) -> None:
    """sql/rescore.sql run as its header says a scheduler would, without the CLI."""
    from anime_udf.udf import register

    con = duckdb.connect(str(store))
    try:
        register(con, baseline=bundle)
        con.execute(f"""
            CREATE TEMP VIEW rescore_catalog AS
                SELECT anime_id AS key, synopsis, genres, studio, episodes FROM read_csv('{catalog}');
            CREATE TEMP MACRO rescore_predict(s, g, st, e) AS predict_score(s, g, st, e);
            CREATE TEMP MACRO rescore_interval(s, g, st, e, level) AS predict_score_interval(s, g, st, e, level);
            SET VARIABLE rescore_model_id = '{model_id(bundle)}';
            SET VARIABLE rescore_model_kind = 'baseline';
            SET VARIABLE rescore_key_column = 'anime_id';
        """)
        if level is not None:
            con.execute("SET VARIABLE rescore_level = ?", [level])
        con.execute(sql_path("rescore.sql").read_text())
    finally:
        con.close()


def test_sql_script_and_cli_agree(tmp_path, models, baseline_bundle):
    a, b = write(catalog_a(), tmp_path / "a.csv"), write(catalog_b(), tmp_path / "b.csv")
    by_sql, by_cli = tmp_path / "sql.duckdb", tmp_path / "cli.duckdb"
    for catalog in (a, b):
        run_sql_script(by_sql, catalog, baseline_bundle)
        rescore(catalog, by_cli)
    sql_rows, cli_rows = snapshot(by_sql), snapshot(by_cli)
    assert [r[:4] + r[5:6] for r in sql_rows["scores"]] == [r[:4] + r[5:6] for r in cli_rows["scores"]]
    # The same scorer, in float32: only batch composition differs (DuckDB's vectors vs the
    # CLI's chunks), which moves the last float32 bit at most.
    np.testing.assert_allclose([r[4] for r in sql_rows["scores"]], [r[4] for r in cli_rows["scores"]],
                               rtol=0, atol=1e-6)
    con = duckdb.connect(str(by_sql), read_only=True)
    sql_runs = con.execute("SELECT rows_scored, rows_removed, catalog_fingerprint FROM rescore_runs "
                           "ORDER BY finished_at").fetchall()
    con.close()
    assert [r[:2] for r in sql_runs] == [(400, 0), (7, 3)]
    # Each side finds the other's store up to date.
    run_sql_script(by_cli, b, baseline_bundle)
    assert rescore(b, by_sql).models[0]["rows_scored"] == 0
    con = duckdb.connect(str(by_cli), read_only=True)
    assert con.execute("SELECT rows_scored, catalog_fingerprint FROM rescore_runs ORDER BY finished_at DESC "
                       "LIMIT 1").fetchone() == (0, sql_runs[-1][2])
    con.close()


# --- crashes and concurrency ------------------------------------------------------------------------------


@pytest.mark.slow  # a process killed or holding the store
@pytest.mark.parametrize("phase", ["score", "commit", "export"])
def test_kill_9_leaves_previous_or_new_state(tmp_path, models, baseline_bundle, phase):
    """A run killed at a phase leaves the store as after the previous run (before COMMIT)
    or as after this one (after it), the export whole; the next run completes the work."""
    store, export = tmp_path / "scores.duckdb", tmp_path / "scores.parquet"
    rescore(write(catalog_a(), tmp_path / "a.csv"), store, export=export)
    before, export_before = snapshot(store), export.read_bytes()
    b = write(catalog_b(), tmp_path / "b.csv")

    err = tmp_path / "stderr.txt"
    proc = cli_subprocess(["--catalog", str(b), "--store", str(store), "--export", str(export)], err,
                          ANIME_UDF_RESCORE_PAUSE_AT=phase)
    wait_for(proc, err, f"paused at {phase}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    abandoned = list(Path(tempfile.gettempdir()).glob(f"{rs.WORK_DIR_PREFIX}{proc.pid}-*"))
    assert len(abandoned) == 1  # kill -9 skips the run's clean-up ...

    after_kill = snapshot(store)
    if phase == "export":  # committed: the store is the new state, the old export intact
        assert len(after_kill["runs"]) == 2
        assert_store_matches(store, catalog_b(), baseline_bundle)
    else:
        assert after_kill == before
    assert export.read_bytes() == export_before

    report = rescore(b, store, export=export)  # the next run completes the work
    assert not abandoned[0].exists()  # ... and removes the killed run's temporary directory
    assert report.models[0]["rows_scored"] == (0 if phase == "export" else 7)
    assert_store_matches(store, catalog_b(), baseline_bundle)
    assert pl.read_parquet(export)["anime_id"].sort().to_list() == sorted(catalog_b()["anime_id"].to_list())


@pytest.mark.slow  # a process killed or holding the store
@pytest.mark.parametrize("applied", [True, False])
def test_failed_commit_is_reported_as_unknown_and_recorded_once(tmp_path, models, baseline_bundle, monkeypatch,
                                                                  applied):
    """A COMMIT that fails may have taken effect all the same (DuckDB: "COMMIT succeeded
    and is durable, but the autocheckpoint failed"); the retry records the run once."""
    store = tmp_path / "scores.duckdb"
    first = rescore(catalog_a(), store)
    b = write(catalog_b(), tmp_path / "b.csv")
    run_section = rs._run

    def commit_fails(con, section):
        if section == "commit" and applied:
            run_section(con, section)
        if section == "commit":
            raise duckdb.IOException('Could not write file "scores.duckdb": No space left on device')
        run_section(con, section)

    with monkeypatch.context() as mp:
        mp.setattr(rs, "_run", commit_fails)
        with pytest.raises(RescoreError, match="may or may not have been applied") as failed:
            rescore(b, store)
    message = str(failed.value)
    run_id = re.match(r"run (\S+) ", message).group(1)
    assert "unchanged" not in message and f"FROM rescore_runs WHERE run_id = '{run_id}' returns rows" in message
    assert snapshot(store)["runs"] == ([first.run_id, run_id] if applied else [first.run_id])

    retry = rescore(b, store)
    assert retry.run_id == run_id and retry.models[0]["rows_scored"] == 7  # the run's record, not a no-op's
    assert snapshot(store)["runs"] == [first.run_id, run_id]
    assert_store_matches(store, catalog_b(), baseline_bundle)
    assert rescore(b, store).run_id != run_id  # a later run of the same catalog is a run of its own


def test_checkpoint_failing_on_a_full_disk_after_commit(tmp_path, models, baseline_bundle):
    """The real thing: the store may not grow (RLIMIT_FSIZE, Python ignores SIGXFSZ), so
    the COMMIT reaches the write-ahead log but the checkpoint closing the store fails."""
    store = tmp_path / "scores.duckdb"
    first = rescore(catalog_a().head(390), store)
    a = write(catalog_a(), tmp_path / "a.csv")  # 10 new rows, their embeddings cached
    size = store.stat().st_size
    result = subprocess.run(
        [sys.executable, "-c", "from anime_udf.cli import cli; cli()", "rescore", "--catalog", str(a),
         "--store", str(store)],
        capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size)))
    assert result.returncode == 1, result.stderr
    run_id = re.search(r"Error: run (\S+) was committed to .*closing the store .*File too large", result.stderr,
                       re.DOTALL).group(1)
    assert snapshot(store)["runs"] == [first.run_id, run_id]  # the write-ahead log had it
    retry = rescore(a, store)
    assert retry.run_id == run_id and retry.models[0]["rows_scored"] == 10
    assert snapshot(store)["runs"] == [first.run_id, run_id]
    assert_store_matches(store, catalog_a(), baseline_bundle)


@pytest.mark.slow  # a process killed or holding the store
def test_concurrent_runs_fail_clearly_or_wait(tmp_path, models, baseline_bundle):
    store = tmp_path / "scores.duckdb"
    catalog = write(catalog_a(), tmp_path / "a.csv")
    err = tmp_path / "stderr.txt"
    proc = cli_subprocess(["--catalog", str(catalog), "--store", str(store)], err,
                          ANIME_UDF_RESCORE_PAUSE_AT="score", ANIME_UDF_RESCORE_PAUSE_SECONDS="8")
    try:
        wait_for(proc, err, "paused at score")
        with pytest.raises(StoreBusyError, match=rf"being rescored by another run \(pid {proc.pid}.*--wait"):
            rescore(catalog, store)
        result = CliRunner().invoke(cli, ["rescore", "--catalog", str(catalog), "--store", str(store), "--json"])
        assert result.exit_code == EXIT_BUSY and "being rescored by another run" in result.output
        busy = json.loads(result.stdout)  # a scheduler tells "try later" from "failed"
        assert busy["status"] == "failed" and busy["exit_code"] == EXIT_BUSY
        waited = rescore(catalog, store, wait=120)  # blocks until the first run is done
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert waited.models[0]["rows_scored"] == 0  # the first run did the work
    assert len(snapshot(store)["runs"]) == 2
    assert_store_matches(store, catalog_a(), baseline_bundle)


def test_store_open_elsewhere_is_a_clear_error(tmp_path, models):
    store = tmp_path / "scores.duckdb"
    rescore(catalog_a(), store)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"import duckdb, time; c = duckdb.connect({str(store)!r}); print('open', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(StoreBusyError, match="open in another process"):
            rescore(catalog_b(), store)
    finally:
        holder.kill()
        holder.wait()
    assert rescore(catalog_b(), store).models[0]["rows_scored"] == 7


# --- the store in a shared warehouse, its lock, and --wait ------------------------------------------


def warehouse_with(path: Path, *statements: str, rows: int = 400) -> Path:
    """A warehouse file with the fixture catalog's first ``rows`` rows as table anime, and the
    user's own ``statements``."""
    con = duckdb.connect(str(path))
    con.execute(f"CREATE TABLE anime AS SELECT * FROM read_csv({quote_literal(CATALOG)}) LIMIT {rows}")
    for statement in statements:
        con.execute(statement)
    con.close()
    return path


def dump(database: Path) -> dict:
    """Every table and view of a database, with its rows."""
    con = duckdb.connect(str(database), read_only=True)
    try:
        names = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables ORDER BY ALL").fetchall()]
        return {n: con.execute(f"SELECT * FROM {quote_ident(n)} ORDER BY ALL").fetchall() for n in names}
    finally:
        con.close()


# A user's table shaped like the store's rescore_meta, with rows of its own.
USER_META = ("CREATE TABLE rescore_meta (name VARCHAR PRIMARY KEY, value VARCHAR NOT NULL); "
             "INSERT INTO rescore_meta VALUES ('key_column', 'the user''s'), ('owner', 'analytics')")


@pytest.mark.parametrize(("statement", "table", "reason"), [
    (USER_META, "rescore_meta", "no rescore_runs or rescore_scores beside it"),
    ("CREATE TABLE rescore_scores (key INTEGER, note VARCHAR)", "rescore_scores",
     "its column 1 is key INTEGER, not key VARCHAR"),
    ("CREATE TABLE rescore_runs AS SELECT 'r1' AS run_id", "rescore_runs",
     "it lacks column 2, started_at TIMESTAMP WITH TIME ZONE"),
    ("CREATE VIEW rescore_meta AS SELECT 'a' AS name, 'b' AS value", "rescore_meta", "it is a view"),
    # DuckDB's names ignore case: these are rescore_meta and rescore_scores too.
    ('CREATE TABLE "RESCORE_META" (name VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)', "RESCORE_META",
     "no rescore_runs or rescore_scores beside it"),
    ('CREATE TABLE "Rescore_Scores" (a INTEGER, b VARCHAR)', "Rescore_Scores",
     "its column 1 is a INTEGER, not key VARCHAR"),
])
def test_a_warehouse_table_named_like_the_stores_is_refused_and_never_written(tmp_path, models, statement, table,
                                                                            reason):
    """The warehouse's other tables are never written: a table of a store table's name that
    the store did not create is the user's, refused by name."""
    warehouse = warehouse_with(tmp_path / "warehouse.duckdb", statement)
    before = dump(warehouse)
    result = CliRunner().invoke(cli, ["rescore", "--catalog", f"{warehouse}:anime", "--store", str(warehouse)])
    assert result.exit_code == 1
    assert result.output == (f"Error: {warehouse}: table {table} is not an anime-udf rescore store's ({reason}); "
                             "use another --store\n")
    assert dump(warehouse) == before


def test_a_user_table_created_while_the_run_scores_is_not_written(tmp_path, models, monkeypatch):
    """The store is closed while the run scores: a table of a store table's name created
    meanwhile is refused when the run opens the store to apply."""
    warehouse = warehouse_with(tmp_path / "warehouse.duckdb", rows=40)
    real_score = rs.score

    def score_while_the_user_creates_a_table(*args, **kwargs):
        real_score(*args, **kwargs)
        con = duckdb.connect(str(warehouse))
        con.execute(USER_META)
        con.close()

    monkeypatch.setattr(rs, "score", score_while_the_user_creates_a_table)
    with pytest.raises(RescoreError, match=r"table rescore_meta is not an anime-udf rescore store's"):
        rescore(f"{warehouse}:anime", warehouse)
    assert set(dump(warehouse)) == {"anime", "rescore_meta"}
    assert dump(warehouse)["rescore_meta"] == [("key_column", "the user's"), ("owner", "analytics")]


def test_a_store_reached_through_a_link_takes_the_real_files_lock(tmp_path, models):
    real = tmp_path / "real" / "scores.duckdb"
    real.parent.mkdir()
    (tmp_path / "link.duckdb").symlink_to(real)
    (tmp_path / "linked-dir").symlink_to(real.parent)
    links = [tmp_path / "link.duckdb", tmp_path / "linked-dir" / "scores.duckdb"]
    assert {rs.lock_path(p) for p in links} == {rs.lock_path(real)} == {real.resolve().with_name("scores.duckdb.lock")}
    with rs.store_lock(real):
        for link in links:
            with pytest.raises(StoreBusyError, match="being rescored by another run"):
                rescore(catalog_a(), link)
    assert not real.exists()


@pytest.mark.slow  # a process killed or holding the store
def test_wait_holds_for_a_table_catalog_in_a_warehouse_open_elsewhere(tmp_path, models):
    """Reading a FILE.duckdb:TABLE catalog waits, as opening the store does, while another
    process has the file open."""
    warehouse = warehouse_with(tmp_path / "warehouse.duckdb", rows=40)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(warehouse)!r}); "
                               "print('open', flush=True); time.sleep(6); c.close()"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(StoreBusyError, match=rf"^{re.escape(str(warehouse))} is open in another process, so "
                                                 rf"--catalog {re.escape(str(warehouse))}:anime cannot be read: "
                                                 r".*; pass --wait SECONDS to wait for it$"):
            rescore(f"{warehouse}:anime", warehouse)
        report = rescore(f"{warehouse}:anime", warehouse, wait=120)
    finally:
        holder.kill()
        holder.wait()
    assert report.models[0]["rows_scored"] == 40


JOIN_BACK = """SELECT a.anime_id, a.title, s.score FROM anime a
     JOIN rescore_scores s ON s.key = CAST(a.anime_id AS VARCHAR) AND s.model_kind = 'fusion'"""
ALERT = """SELECT run_id, model_kind, rows_scored, rows_seen, score_mean
    FROM rescore_runs WHERE started_at > now() - INTERVAL 1 DAY
    AND (rows_scored > rows_seen / 10 OR abs(shift_mean) > 0.1)"""


def scheduled_command(line: str, home: Path) -> str:
    """An example's command line (examples/nightly) for this machine: its home directory a
    temporary one, its anime-udf this environment's."""
    anime_udf = str(Path(sys.executable).parent / "anime-udf")
    line = re.sub(r"(/srv/anime/)?\.venv/bin/anime-udf", anime_udf, line)
    return line.replace("/srv/anime", str(home))


@pytest.mark.slow  # fresh processes, as cron and systemd start them
def test_the_nightly_examples_run_as_written(tmp_path, baseline_bundle):
    """The cron line prints nothing on success (cron mails nothing) and the failure's JSON on
    failure; the systemd unit's command prints the run record as JSON, and exits non-zero on
    failure (the unit fails and starts its OnFailure= alert)."""
    home = tmp_path / "srv"
    shutil.copytree(baseline_bundle, home / "models" / baseline_bundle.name)
    read_catalog(CATALOG).write_parquet(home / "catalog.parquet")
    examples = ROOT / "examples" / "nightly"
    [cron] = [line for line in (examples / "crontab").read_text().splitlines() if line[:1].isdigit()]
    cron = scheduled_command(cron.split(None, 5)[5], home)
    service = dict(line.split("=", 1) for line in (examples / "anime-udf-rescore.service").read_text().splitlines()
                   if "=" in line and not line.startswith("#"))
    env = {**os.environ, **dict(pair.split("=") for pair in scheduled_command(service["Environment"], home).split())}

    first = subprocess.run(["bash", "-c", cron], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0 and first.stdout == "", first.stdout + first.stderr
    assert json.loads((home / "last-run.json").read_text())["models"][0]["rows_scored"] == 400
    second = subprocess.run(scheduled_command(service["ExecStart"], home).split(), cwd=home, env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["models"][0]["rows_reused"] == 400

    # The rescoring page's queries, as written: the join back to the catalog, the alert on a run record.
    page = (ROOT / "docs" / "rescoring.md").read_text()
    for query, rows in ((JOIN_BACK, 400), (ALERT, 1)):  # the first night scored every row: worth a look
        assert " ".join(query.split()) in " ".join(page.split())
        result = CliRunner().invoke(cli, ["sql", "--db", str(home / "scores.duckdb"), "--table",
                                          f"anime={home / 'catalog.parquet'}", "--out", str(tmp_path / "q.csv"),
                                          query.replace("fusion", "baseline")])
        assert result.exit_code == 0 and pl.read_csv(tmp_path / "q.csv").height == rows, result.output

    (home / "catalog.parquet").unlink()
    mailed = subprocess.run(["bash", "-c", cron], capture_output=True, text=True, timeout=600).stdout
    assert json.loads(mailed)["status"] == "failed" and "catalog.parquet: no such file" in json.loads(mailed)["error"]
    failed = subprocess.run(scheduled_command(service["ExecStart"], home).split(), cwd=home, env=env,
                            capture_output=True, text=True, timeout=600)
    assert failed.returncode == EXIT_USAGE and json.loads(failed.stdout)["exit_code"] == EXIT_USAGE  # the unit fails
