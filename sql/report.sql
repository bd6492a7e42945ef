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

-- Each title once per genre it names (case and spaces around names do not matter, as for the
-- models), its genre as first written and the group it counts in.
CREATE OR REPLACE TEMP MACRO genre_rows(tbl) AS TABLE
SELECT q.*, trim(g) AS genre, lower(trim(g)) AS grp
FROM query_table(tbl) q, unnest(string_split(q.genres, ',')) AS t(g)
WHERE trim(g) <> '';

-- The k most frequent genres of genre_rows: a title counts in each of its genres.
CREATE OR REPLACE TEMP MACRO top_genres(tbl, k) AS TABLE
SELECT grp, min(genre) AS genre, count(DISTINCT row_id) AS titles
FROM genre_rows(tbl) GROUP BY grp
ORDER BY titles DESC, grp LIMIT k;

CREATE OR REPLACE TEMP MACRO error_by_genre(tbl, k) AS TABLE
WITH tagged AS (SELECT model, grp, y, yhat FROM genre_rows(tbl))
SELECT e.model, top.genre, e.n, e.mae, e.rmse, e.bias
FROM group_errors('tagged') e JOIN top_genres(tbl, k) top USING (grp)
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

-- Prediction intervals, from a table of intervals, one row per (model, level, catalog row):
--   model, level, row_id, genres, episodes, y, yhat, lo, hi
-- (`anime-udf eval --report` builds `interval_levels` at several levels and `intervals` at one,
-- each model beside its constant width: docs/intervals.md).
--
--   SELECT * FROM interval_reliability('interval_levels');
--   SELECT * FROM interval_by_band('intervals', 5);

-- Reliability: each model's observed coverage and mean width at each nominal level.
CREATE OR REPLACE TEMP MACRO interval_reliability(tbl) AS TABLE
SELECT model, level, count(*) AS n, interval_coverage(y, lo, hi) AS coverage, interval_width(lo, hi) AS mean_width
FROM query_table(tbl)
GROUP BY model, level
ORDER BY model, level;

-- Coverage and width in `bands` equal-count bands of the predicted score (1: the lowest).
CREATE OR REPLACE TEMP MACRO interval_by_band(tbl, bands) AS TABLE
WITH banded AS (
    SELECT model, y, yhat, lo, hi, ntile(bands) OVER (PARTITION BY model, level ORDER BY yhat, row_id) AS band
    FROM query_table(tbl)
)
SELECT band, model, count(*) AS n, min(yhat) AS lowest_predicted, max(yhat) AS highest_predicted,
       interval_coverage(y, lo, hi) AS coverage, interval_width(lo, hi) AS mean_width
FROM banded
GROUP BY band, model
ORDER BY band, model;

-- Coverage and width in the k most frequent genres (as error_by_genre counts them).
CREATE OR REPLACE TEMP MACRO interval_by_genre(tbl, k) AS TABLE
SELECT top.genre, t.model, count(*) AS n, interval_coverage(t.y, t.lo, t.hi) AS coverage,
       interval_width(t.lo, t.hi) AS mean_width
FROM genre_rows(tbl) t JOIN top_genres(tbl, k) top USING (grp)
GROUP BY top.genre, top.titles, top.grp, t.model
ORDER BY top.titles DESC, top.grp, t.model;

-- Coverage and width in the episode-count buckets of error_by_episodes.
CREATE OR REPLACE TEMP MACRO interval_by_episodes(tbl) AS TABLE
WITH bucketed AS (
    SELECT model, y, lo, hi, episode_bucket(episodes) AS grp,
           CASE WHEN episodes IS NULL OR episodes < 0 THEN NULL ELSE episodes END AS known
    FROM query_table(tbl)
),
bucket_order AS (SELECT grp, min(known) AS lowest FROM bucketed GROUP BY grp)
SELECT b.grp AS episodes, b.model, count(*) AS n, interval_coverage(b.y, b.lo, b.hi) AS coverage,
       interval_width(b.lo, b.hi) AS mean_width
FROM bucketed b JOIN bucket_order USING (grp)
GROUP BY b.grp, bucket_order.lowest, b.model
ORDER BY bucket_order.lowest NULLS LAST, b.grp, b.model;

-- The k largest misses (largest_misses) with each model's interval from a table of intervals.
CREATE OR REPLACE TEMP MACRO largest_miss_intervals(predictions, intervals, k) AS TABLE
SELECT m.row_id, m.key, m.title, m.actual, m.model, m.predicted, m.largest_error, i.lo, i.hi
FROM largest_misses(predictions, k) m LEFT JOIN query_table(intervals) i USING (model, row_id)
ORDER BY m.largest_error DESC, m.row_id, m.model;
