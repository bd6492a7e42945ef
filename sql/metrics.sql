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

-- Prediction intervals (lo, hi) at a level (predict_score_interval(…, level) returns them):
--   SELECT interval_coverage(score, i.lo, i.hi), interval_width(i.lo, i.hi), interval_score(score, i.lo, i.hi, 0.9)
--   FROM (SELECT score, predict_score_interval(synopsis, genres, studio, episodes, 0.9) AS i FROM anime);
-- Coverage: the share of rows inside their interval; width: the mean of hi - lo.
CREATE OR REPLACE TEMP MACRO interval_coverage(y, lo, hi) AS avg(CASE WHEN y BETWEEN lo AND hi THEN 1.0 ELSE 0.0 END);

CREATE OR REPLACE TEMP MACRO interval_width(lo, hi) AS avg(hi - lo);

-- The interval score (Gneiting & Raftery 2007, the proper scoring rule for central intervals at
-- `level`): the width plus 2 / (1 - level) times the distance by which y falls outside. Lower is better;
-- narrowing an interval pays only where it still covers.
CREATE OR REPLACE TEMP MACRO interval_score(y, lo, hi, level) AS
    avg((hi - lo) + 2.0 / (1 - level) * (greatest(lo - y, 0) + greatest(y - hi, 0)));

-- All three per model, from a table or view with columns model, y, lo, hi:
--   SELECT * FROM interval_metrics('intervals', 0.9);
CREATE OR REPLACE TEMP MACRO interval_metrics(tbl, level) AS TABLE
SELECT model,
       count(*)                          AS n,
       interval_coverage(y, lo, hi)      AS coverage,
       interval_width(lo, hi)            AS mean_width,
       interval_score(y, lo, hi, level)  AS interval_score
FROM query_table(tbl)
WHERE y IS NOT NULL AND lo IS NOT NULL AND hi IS NOT NULL
GROUP BY model
ORDER BY model;
