"""The fast paths keep the contracts: bf16 scores stay within their tolerance of fp32 and never
share cache entries with them, a row's score does not depend on its batch or DuckDB's thread
count (within 1e-5 at fp32 on any CPU; identical once its embedding is cached), and
registering loads nothing heavy."""

import os
import shutil
import sqlite3
import subprocess
import sys

import duckdb
import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

import anime_udf
from anime_udf import devices
from anime_udf.bundle import BundleError
from anime_udf.cache import EmbeddingCache
from anime_udf.catalog import read_catalog
from anime_udf.cli import cli
from anime_udf.devices import DeviceError, resolve_precision
from anime_udf.scoring import load_scorer
from anime_udf.text import FrozenTextEncoder
from tests.conftest import BF16_TOLERANCE, FP32_TOLERANCE, HOLDOUT, ROOT
from tests.test_udf import EDGE_ROWS

FUNCTIONS = {"baseline": "predict_score", "fusion": "predict_score_fusion"}
INPUTS = ("synopsis", "genres", "studio", "episodes")


def sql_scores(kind, bundle, precision, rows=None, threads=2) -> np.ndarray:
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    anime_udf.register(con, **{kind: bundle}, precision=precision)
    con.register("catalog", rows if rows is not None else read_catalog(HOLDOUT).with_row_index("i"))
    fn = FUNCTIONS[kind]
    return con.sql(f"SELECT {fn}(synopsis, genres, studio, episodes) AS p FROM catalog ORDER BY i").pl()["p"].to_numpy()


def test_bf16_scores_are_within_tolerance_of_fp32(kind, bundle):
    fp32, bf16 = sql_scores(kind, bundle, "fp32"), sql_scores(kind, bundle, "bf16")
    assert np.abs(bf16 - fp32).max() <= BF16_TOLERANCE
    assert not np.array_equal(bf16, fp32)  # bf16 really ran
    y = read_catalog(HOLDOUT).with_row_index("i")["score"].to_numpy()
    assert abs(np.abs(bf16 - y).mean() - np.abs(fp32 - y).mean()) <= 0.001


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_odd_and_missing_inputs_keep_the_contracts_at_each_precision(kind, bundle, precision):
    rows = pl.DataFrame(EDGE_ROWS, schema={"synopsis": pl.String, "genres": pl.String, "studio": pl.String,
                                           "episodes": pl.Float64}, orient="row").with_row_index("i")
    scores = sql_scores(kind, bundle, precision, rows)
    assert len(scores) == len(EDGE_ROWS) and np.isfinite(scores).all()
    assert ((scores >= 1) & (scores <= 10)).all()


def test_fp32_and_bf16_embeddings_never_mix_in_the_cache(tmp_path):
    cache = EmbeddingCache(tmp_path / "embeddings.sqlite")
    texts = read_catalog(HOLDOUT)["synopsis"].to_list()[:6]
    fp32 = FrozenTextEncoder(cache=cache, precision="fp32", device="cpu")
    bf16 = FrozenTextEncoder(cache=cache, precision="bf16", device="cpu")
    assert fp32.encoder_id != bf16.encoder_id and bf16.encoder_id.endswith("|bf16")
    from_bf16 = bf16.embed(texts)
    from_fp32 = fp32.embed(texts)  # not served from the bf16 entries just written
    assert not np.array_equal(from_bf16, from_fp32)
    np.testing.assert_allclose(FrozenTextEncoder(cache=None, precision="fp32", device="cpu").embed(texts), from_fp32,
                               rtol=0, atol=FP32_TOLERANCE)  # computed again: the contract's tolerance
    with sqlite3.connect(cache.path) as con:
        per_encoder = dict(con.execute("SELECT encoder, count(*) FROM embeddings GROUP BY encoder").fetchall())
    assert per_encoder == {fp32.encoder_id: 6, bf16.encoder_id: 6}


# The contracts every CPU keeps (tests/conftest.py): fp32 scores agree within FP32_TOLERANCE, bf16
# scores within BF16_TOLERANCE of fp32 (tested above), and once a synopsis's embedding is cached,
# scoring the same rows again gives identical scores.
def agreement(precision: str) -> float:
    return FP32_TOLERANCE if resolve_precision(precision, torch.device("cpu")) == "fp32" else BF16_TOLERANCE


def holdout_inputs(n=40):
    rows = read_catalog(HOLDOUT).head(n)
    synopses = rows["synopsis"].to_list() + ["", "Short.", "word " * 400]
    extra = len(synopses) - rows.height
    return (synopses, rows["genres"].to_list() + ["Action"] * extra, rows["studio"].to_list() + [None] * extra,
            rows["episodes"].to_list() + [12] * extra)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_score_does_not_depend_on_its_batch(bundle, precision, tmp_path):
    """Each row scored alone against all of them together, each way with an empty cache of its own."""
    def scorer(name):
        return load_scorer(bundle, cache=EmbeddingCache(tmp_path / name), precision=precision, device="cpu")

    inputs = holdout_inputs()
    together = scorer("together.sqlite").predict(*inputs)
    alone_scorer = scorer("alone.sqlite")
    alone = np.array([alone_scorer.predict(*([column[i]] for column in inputs))[0] for i in range(len(together))])
    np.testing.assert_allclose(alone, together, rtol=0, atol=agreement(precision))


def test_a_cached_embedding_makes_every_later_score_identical(bundle, tmp_path):
    """A later run (a new scorer over the same cache) scores the same rows exactly as the first did."""
    def scorer():
        return load_scorer(bundle, cache=EmbeddingCache(tmp_path / "embeddings.sqlite"), precision="auto", device="cpu")

    inputs = holdout_inputs()
    first = scorer().predict(*inputs)  # encodes and caches
    later = scorer()
    np.testing.assert_array_equal(later.predict(*inputs), first)
    assert later.text_encoder._model is None  # every embedding came from the cache: the encoder never loaded


def test_duckdb_thread_count_does_not_change_scores(kind, bundle, tmp_path, monkeypatch):
    rows = read_catalog(HOLDOUT).head(60).with_row_index("i")
    monkeypatch.setenv("ANIME_UDF_CACHE", str(tmp_path / "one"))
    one = sql_scores(kind, bundle, "auto", rows, threads=1)
    monkeypatch.setenv("ANIME_UDF_CACHE", str(tmp_path / "two"))  # encoded again, not read from the cache
    two = sql_scores(kind, bundle, "auto", rows, threads=2)
    np.testing.assert_allclose(one, two, rtol=0, atol=agreement("auto"))


def test_auto_precision_follows_the_hardware(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", cuda) == "fp32"
    with pytest.raises(DeviceError, match="unknown precision 'fp16': use one of auto, fp32, bf16"):
        resolve_precision("fp16", cpu)


def test_auto_precision_is_fp32_when_the_kernels_are_limited_to_avx2(monkeypatch):
    """An older CPU, as CI emulates one: bf16 would run in software there, slower than fp32."""
    code = "import torch; from anime_udf.devices import resolve_precision; print(resolve_precision('auto', torch.device('cpu')))"
    limited = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
                             capture_output=True, text=True, check=True, cwd=ROOT)
    assert limited.stdout.strip() == "fp32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_precision_is_an_option_of_every_command_that_scores_or_trains(baseline_bundle):
    for command in (["sql", "SELECT 1"], ["score", "--data", HOLDOUT, "--out", "x.parquet"],
                    ["eval", "--data", HOLDOUT], ["rescore", "--catalog", HOLDOUT, "--store", "s.duckdb"],
                    ["train", "baseline", "--data", HOLDOUT], ["train", "fusion", "--data", HOLDOUT]):
        result = CliRunner().invoke(cli, [*map(str, command), "--precision", "fp16"])
        assert result.exit_code == 2 and "'fp16' is not one of 'auto', 'fp32', 'bf16'" in result.output, command
    result = CliRunner().invoke(cli, ["eval", "--data", str(HOLDOUT), "--model", str(baseline_bundle),
                                      "--precision", "fp32", "--json"])
    assert result.exit_code == 0, result.output


def test_the_scorer_records_its_precision(baseline_bundle):
    assert load_scorer(baseline_bundle, precision="bf16").text_encoder.precision == "bf16"
    assert load_scorer(baseline_bundle, precision="fp32").text_encoder.encoder_id.endswith("|fp32")


def test_register_checks_bundles_but_loads_them_on_the_first_call(baseline_bundle, tmp_path):
    code = ("import sys, duckdb, anime_udf\n"
            "con = duckdb.connect()\n"
            "(scorer,) = anime_udf.register(con, baseline=sys.argv[1]).values()\n"
            "assert not scorer.loaded and 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
            "score = con.sql(\"SELECT predict_score('A war story.', 'Drama', NULL, 12)\").fetchall()[0][0]\n"
            "assert scorer.loaded and 1 <= score <= 10\n")
    subprocess.run([sys.executable, "-c", code, str(baseline_bundle)], check=True, cwd=ROOT)

    broken = tmp_path / "broken"
    shutil.copytree(baseline_bundle, broken)
    with open(broken / "model.safetensors", "r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x00" if fh.read(1) != b"\x00" else b"\x01")
    with pytest.raises(BundleError, match="model.safetensors: checksum mismatch"):
        anime_udf.register(duckdb.connect(), baseline=broken)


def test_the_encoder_batch_size_comes_from_the_environment(monkeypatch):
    """CI's second pass scores in batches of another size ($ANIME_UDF_ENCODER_BATCH), so that a test
    relying on one batch shape fails in CI rather than on the next machine."""
    from anime_udf.text import EncoderError

    monkeypatch.setenv("ANIME_UDF_ENCODER_BATCH", "3")
    assert FrozenTextEncoder(cache=None).batch_size == 3
    monkeypatch.setenv("ANIME_UDF_ENCODER_BATCH", "lots")
    with pytest.raises(EncoderError, match=r"\$ANIME_UDF_ENCODER_BATCH is 'lots': expected a whole number"):
        FrozenTextEncoder(cache=None)


def test_bf16_embeddings_point_where_fp32_ones_do():
    """bf16 runs end to end (weights, activations, layer norms): each embedding points where its fp32
    one does (measured: cosine ≥ 0.99991 on real synopses; the bound leaves room for other CPUs,
    and the scores' own contract, 0.02 of fp32, is tested above)."""
    texts = read_catalog(HOLDOUT)["synopsis"].to_list()
    fp32, bf16 = (FrozenTextEncoder(cache=None, precision=p, device="cpu").embed(texts) for p in ("fp32", "bf16"))
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() >= 0.9995
