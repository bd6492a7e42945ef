-- Grouped queries behind the evaluation report (anime-udf eval --report), as DuckDB macros.
-- Load after the metric macros:  .read sql/metrics.sql   then   .read sql/report.sql
--
-- Each takes a table, view or Parquet file of predictions, one row per (model, catalog row):
--   model, row_id (the row's number in the catalog), key (anime_id, else row_id), title,
--   genres, studio, episodes, y (the true score), yhat (the prediction)
-- The README shows how to build one from `anime-udf score` output. Residuals are yhat - y:
-- positive means the model scored a title too high.
--
--   SELECT * FROM error_by_genre('predictions', 12);
--   SELECT * FROM calibration('predictions', 10);

-- Error of each model within groups of rows, from (model, grp, y, yhat).
CREATE OR REPLACE TEMP MACRO group_errors(tbl) AS TABLE
SELECT model, grp, count(*) AS n, mae(y, yhat) AS mae, rmse(y, yhat) AS rmse, avg(yhat - y) AS bias
FROM query_table(tbl)
GROUP BY model, grp;

-- The k most frequent genres (case and spaces around names do not matter, as for the models);
-- a title counts in each of its genres.
CREATE OR REPLACE TEMP MACRO error_by_genre(tbl, k) AS TABLE
WITH tagged AS (
    SELECT model, row_id, y, yhat, trim(g) AS genre, lower(trim(g)) AS grp
    FROM query_table(tbl), unnest(string_split(genres, ',')) AS t(g)
    WHERE trim(g) <> ''
),
top AS (
    SELECT grp, min(genre) AS genre, count(DISTINCT row_id) AS titles
    FROM tagged GROUP BY grp
    ORDER BY titles DESC, grp LIMIT k
)
SELECT e.model, top.genre, e.n, e.mae, e.rmse, e.bias
FROM group_errors('tagged') e JOIN top USING (grp)
ORDER BY top.titles DESC, top.grp, e.model;

-- Episode-count buckets (NULL and negative counts are missing, as for the models).
CREATE OR REPLACE TEMP MACRO episode_bucket(episodes) AS CASE
    WHEN episodes IS NULL OR episodes < 0 THEN 'unknown'
    WHEN episodes <= 1 THEN '0-1'
    WHEN episodes <= 6 THEN '2-6'
    WHEN episodes <= 13 THEN '7-13'
    WHEN episodes <= 26 THEN '14-26'
    WHEN episodes <= 52 THEN '27-52'
    WHEN episodes <= 100 THEN '53-100'
    ELSE '101+' END;

CREATE OR REPLACE TEMP MACRO error_by_episodes(tbl) AS TABLE
WITH bucketed AS (
    SELECT model, y, yhat, episode_bucket(episodes) AS grp,
           CASE WHEN episodes IS NULL OR episodes < 0 THEN NULL ELSE episodes END AS known
    FROM query_table(tbl)
),
bucket_order AS (SELECT grp, min(known) AS lowest FROM bucketed GROUP BY grp)
SELECT e.model, e.grp AS episodes, e.n, e.mae, e.rmse, e.bias
FROM group_errors('bucketed') e JOIN bucket_order USING (grp)
ORDER BY bucket_order.lowest NULLS LAST, e.model;

-- The k studios with the most titles (rows without a studio are left out).
CREATE OR REPLACE TEMP MACRO error_by_studio(tbl, k) AS TABLE
WITH named AS (
    SELECT model, row_id, y, yhat, trim(studio) AS grp
    FROM query_table(tbl)
    WHERE trim(studio) <> ''
),
top AS (
    SELECT grp, count(DISTINCT row_id) AS titles
    FROM named GROUP BY grp
    ORDER BY titles DESC, grp LIMIT k
)
SELECT e.model, e.grp AS studio, e.n, e.mae, e.rmse, e.bias
FROM group_errors('named') e JOIN top USING (grp)
ORDER BY top.titles DESC, top.grp, e.model;

-- Calibration: each model's rows cut into `bins` equal-count bins by prediction;
-- a calibrated model has mean_actual close to mean_predicted in every bin.
CREATE OR REPLACE TEMP MACRO calibration(tbl, bins) AS TABLE
WITH binned AS (
    SELECT model, y, yhat, ntile(bins) OVER (PARTITION BY model ORDER BY yhat, row_id) AS bin
    FROM query_table(tbl)
)
SELECT model, bin, count(*) AS n, avg(yhat) AS mean_predicted, avg(y) AS mean_actual,
       min(yhat) AS lowest_predicted, max(yhat) AS highest_predicted
FROM binned
GROUP BY model, bin
ORDER BY model, bin;

-- Histogram of the residuals yhat - y in bins of `width`; `lower` is each bin's lower edge.
CREATE OR REPLACE TEMP MACRO residual_histogram(tbl, width) AS TABLE
SELECT model, floor((yhat - y) / width) * width AS lower, count(*) AS n
FROM query_table(tbl)
GROUP BY model, lower
ORDER BY model, lower;

-- The k rows with the largest absolute error of any model, each model's prediction beside it.
CREATE OR REPLACE TEMP MACRO largest_misses(tbl, k) AS TABLE
WITH worst AS (
    SELECT row_id, max(abs(yhat - y)) AS largest_error
    FROM query_table(tbl)
    GROUP BY row_id
    ORDER BY largest_error DESC, row_id LIMIT k
)
SELECT p.row_id, p.key, p.title, p.y AS actual, p.model, p.yhat AS predicted, w.largest_error
FROM query_table(tbl) p JOIN worst w USING (row_id)
ORDER BY w.largest_error DESC, p.row_id, p.model;

-- What each model listens to: the mean absolute part of each input group, from a table of
-- explanations, one row per (model, row_id) with base, one column per group, unclamped and score
-- (`anime-udf eval --report` builds `explanations` with explain_score / explain_score_fusion).
CREATE OR REPLACE TEMP MACRO mean_abs_parts(tbl) AS TABLE
SELECT model, "group", count(part) AS n, avg(abs(part)) AS mean_abs_part, avg(part) AS mean_part
FROM (UNPIVOT (SELECT * EXCLUDE (row_id, key, title, base, unclamped, score) FROM query_table(tbl))
      ON COLUMNS(* EXCLUDE (model)) INTO NAME "group" VALUE part)
GROUP BY model, "group"
ORDER BY list_position(['synopsis', 'genres', 'studio', 'episodes', 'lexical'], "group"), model;

-- The k largest misses (largest_misses) with each model's parts: why it predicted what it did.
CREATE OR REPLACE TEMP MACRO largest_miss_parts(predictions, explanations, k) AS TABLE
SELECT m.row_id, m.key, m.title, m.actual, m.model, m.predicted, e.* EXCLUDE (model, row_id, key, title)
FROM largest_misses(predictions, k) m JOIN query_table(explanations) e USING (model, row_id)
ORDER BY m.largest_error DESC, m.row_id, m.model;
