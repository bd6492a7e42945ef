-- Regression metrics as DuckDB macros an analyst can reuse in any query.
-- Load with:  .read sql/metrics.sql   (or anime_udf.metrics.load_metric_macros(con))
--
-- Aggregates over (y = true score, yhat = prediction):
--   SELECT mae(score, p), rmse(score, p), r2(score, p) FROM (SELECT score, predict_score(...) AS p FROM anime);
-- All four metrics per model, from a table or view with columns model, y, yhat:
--   SELECT * FROM regression_metrics('predictions');
-- TEMP macros: they belong to the connection, so loading them writes nothing into a
-- database file (and works on one opened read-only).

CREATE OR REPLACE TEMP MACRO mae(y, yhat) AS avg(abs(y - yhat));

CREATE OR REPLACE TEMP MACRO rmse(y, yhat) AS sqrt(avg((y - yhat) ^ 2));

-- R² = 1 - SSE/SST (regr_r2 would be the squared Pearson correlation, a different thing).
CREATE OR REPLACE TEMP MACRO r2(y, yhat) AS 1 - sum((y - yhat) ^ 2) / (var_pop(y) * count(y));

-- Average rank of a value among ties: rank() gives the lowest rank of a tie group,
-- so add half of the group's size minus one. Spearman = corr of average ranks.
CREATE OR REPLACE TEMP MACRO regression_metrics(tbl) AS TABLE
WITH pairs AS (
    SELECT model, y::DOUBLE AS y, yhat::DOUBLE AS yhat
    FROM query_table(tbl)
    WHERE y IS NOT NULL AND yhat IS NOT NULL
),
ranked AS (
    SELECT *,
        rank() OVER (PARTITION BY model ORDER BY y)
            + (count(*) OVER (PARTITION BY model, y) - 1) / 2.0 AS y_rank,
        rank() OVER (PARTITION BY model ORDER BY yhat)
            + (count(*) OVER (PARTITION BY model, yhat) - 1) / 2.0 AS yhat_rank
    FROM pairs
)
SELECT model,
       count(*)               AS n,
       mae(y, yhat)           AS mae,
       rmse(y, yhat)          AS rmse,
       -- NULL, not NaN, where it is undefined (constant predictions: the training mean's).
       CASE WHEN var_pop(y_rank) > 0 AND var_pop(yhat_rank) > 0 THEN corr(y_rank, yhat_rank) END AS spearman,
       r2(y, yhat)            AS r2
FROM ranked
GROUP BY model
ORDER BY model;
