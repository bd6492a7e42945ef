import duckdb
import numpy as np
import polars as pl
import pytest
from scipy.stats import spearmanr

from anime_udf.metrics import compute_metrics, load_metric_macros, metrics_table


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sql_metrics_equal_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(1, 8, 300) / 2.0  # many ties in both columns
    yhat = np.round(y + rng.normal(0, 1, 300), 1)
    m = compute_metrics(y, yhat)
    assert m["n"] == 300
    assert m["mae"] == pytest.approx(np.mean(np.abs(y - yhat)), abs=1e-9)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((y - yhat) ** 2)), abs=1e-9)
    assert m["spearman"] == pytest.approx(spearmanr(y, yhat).statistic, abs=1e-9)
    r2 = 1 - np.sum((y - yhat) ** 2) / np.sum((y - y.mean()) ** 2)
    assert m["r2"] == pytest.approx(r2, abs=1e-9)


def test_metrics_per_model_and_scalar_macros():
    con = duckdb.connect()
    preds = pl.DataFrame({"model": ["a"] * 3 + ["b"] * 3, "y": [1.0, 2.0, 3.0] * 2,
                          "yhat": [1.0, 2.0, 3.0, 3.0, 2.0, 1.0]})
    con.register("preds", preds)
    table = metrics_table(con, "preds")
    assert table["model"].to_list() == ["a", "b"]
    assert table["mae"].to_list() == [0.0, pytest.approx(4 / 3)]
    assert table["spearman"].to_list() == [pytest.approx(1.0), pytest.approx(-1.0)]
    load_metric_macros(con)
    assert con.execute("SELECT mae(y, yhat) FROM preds WHERE model = 'b'").fetchall()[0][0] == pytest.approx(4 / 3)
