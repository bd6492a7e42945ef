-- Nightly rescoring in DuckDB SQL: incremental (content-hashed inputs), crash-safe
-- (one transaction per run) and recorded (one run record per model and run).
--
-- `anime-udf rescore` runs the sections of this file itself (anime_udf/rescore/),
-- scoring the `score` step in Python with a progress bar; everything else, the hash
-- included, is this SQL, so the command and a scheduler running this file agree.
--
-- Running it without the CLI (one model per run), e.g. from an Airflow Python task:
--
--   import duckdb, anime_udf.rescore as r, anime_udf.udf as u
--   con = duckdb.connect("scores.duckdb")            -- the store: tables below
--   u.register(con, baseline="models/baseline-r2")   -- predict_score(...)
--   con.execute("""
--     CREATE TEMP VIEW rescore_catalog AS             -- key + the four model inputs
--       SELECT anime_id AS key, synopsis, genres, studio, episodes FROM read_csv('catalog.csv');
--     CREATE TEMP MACRO rescore_predict(s, g, st, e) AS predict_score(s, g, st, e);
--     CREATE TEMP MACRO rescore_interval(s, g, st, e, level) AS predict_score_interval(s, g, st, e, level);
--     SET VARIABLE rescore_model_id   = '<r.model_id(bundle)>';   -- e.g. baseline-3f2a9c1d7e4b
--     SET VARIABLE rescore_model_kind = 'baseline';
--     SET VARIABLE rescore_key_column = 'anime_id';
--     SET VARIABLE rescore_catalog    = 'catalog.csv';             -- recorded, optional
--     SET VARIABLE rescore_bundle     = 'models/baseline-r2';      -- recorded, optional
--     SET VARIABLE rescore_alias      = 'production';  -- recorded, optional: why this bundle
--     SET VARIABLE rescore_level      = 0.9;   -- optional: each score's interval at this level
--   """)
--   con.execute(open("sql/rescore.sql").read())      -- this file, top to bottom
--
-- (for the fusion model: predict_score_fusion, predict_score_fusion_interval and
-- rescore_model_kind = 'fusion').
-- A failure anywhere before COMMIT changes nothing in the store (close the connection,
-- or ROLLBACK, to end the failed transaction). Run one such job at a time per store.
--
-- Store tables:
--   rescore_scores  one row per (key, model_id): the score, the input hash it was
--                   computed from, whether an input was imputed, the run that wrote it,
--                   and the score's prediction interval [lo, hi] at its level (NULL for
--                   a row scored by a run without a level).
--                   It holds the current model of each kind only: a new bundle's rows
--                   replace the old bundle's rows of that kind (counted as superseded).
--                   Keys gone from the catalog lose their rows of every kind (counted
--                   as removed: keys, not rows, so the same in each model's record).
--   rescore_runs    one row per (run_id, model_kind): counts, score distribution, and
--                   its shift against the previous run of that kind.
--   rescore_meta    schema version and the key column the store is keyed by.
--
-- The tables are created as the first release made them (schema version 1) and then
-- altered to this version's: a store of an earlier version is upgraded in place by
-- its next run, in the run's one transaction (a run killed midway leaves it as it was).


-- @section macros
-- The inputs as the models read them (anime_udf/features.py; docs/DESIGN.md, "NULL policy"),
-- so that two rows hash alike only if every model scores them alike, and a respelling no model
-- reads is no change:
-- - synopsis: blank is NULL, other text as written (a change of its whitespace alone hashes
--   apart and is rescored, to the same score: collapsing the runs would read every long text
--   once more, making the input section half as slow again; docs/performance.md);
-- - genres: the set of names, each stripped, in ASCII lower case, sorted; none is NULL;
-- - studio: whitespace runs as one space, stripped, in ASCII lower case; blank is NULL;
-- - episodes: NULL, negative, fractional, NaN and ±inf missing; counts from the cap on alike.
-- Case is folded for ASCII letters only: Python's casefold and DuckDB's lower differ beyond
-- them, so other letters differing in case hash apart (rescored, to the same score).
CREATE OR REPLACE TEMP MACRO rescore_whitespace() AS  -- what Python's str.split() and str.strip() take
    chr(9) || chr(10) || chr(11) || chr(12) || chr(13) || chr(28) || chr(29) || chr(30) || chr(31) || ' '
    || chr(133) || chr(160) || chr(5760) || chr(8192) || chr(8193) || chr(8194) || chr(8195) || chr(8196)
    || chr(8197) || chr(8198) || chr(8199) || chr(8200) || chr(8201) || chr(8202) || chr(8232) || chr(8233)
    || chr(8239) || chr(8287) || chr(12288);

CREATE OR REPLACE TEMP MACRO rescore_ascii_lower(x) AS
    translate(CAST(x AS VARCHAR), 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz');

CREATE OR REPLACE TEMP MACRO rescore_synopsis(x) AS
    CASE WHEN NOT regexp_full_match(CAST(x AS VARCHAR), '[' || rescore_whitespace() || ']*') THEN CAST(x AS VARCHAR) END;

CREATE OR REPLACE TEMP MACRO rescore_genres(g) AS  -- features.parse_genres, as a set
    nullif(array_to_string(list_sort(list_distinct(list_filter(string_split(regexp_replace(rescore_ascii_lower(g),
        '[' || rescore_whitespace() || ']*,[' || rescore_whitespace() || ']*|^[' || rescore_whitespace() || ']+|['
        || rescore_whitespace() || ']+$', ',', 'g'), ','), lambda n: n <> ''))), ','), '');

CREATE OR REPLACE TEMP MACRO rescore_studio(x) AS  -- features.studio_key
    nullif(trim(regexp_replace(rescore_ascii_lower(x), '[' || rescore_whitespace() || ']+', ' ', 'g')), '');

CREATE OR REPLACE TEMP MACRO rescore_episodes(e) AS  -- features.log_episodes: capped at 10,000
    CASE WHEN e IS NULL OR NOT isfinite(CAST(e AS DOUBLE)) OR CAST(e AS DOUBLE) < 0
              OR CAST(e AS DOUBLE) <> round(CAST(e AS DOUBLE)) THEN NULL
         ELSE CAST(least(CAST(e AS DOUBLE), 10000) AS BIGINT)::VARCHAR END;

-- sha256 over a length-prefixed encoding ('N' for a missing value, 'S<bytes>:<text>'
-- otherwise), so no choice of text can make two different rows encode alike.
CREATE OR REPLACE TEMP MACRO rescore_field(x) AS
    CASE WHEN x IS NULL THEN 'N' ELSE 'S' || strlen(x) || ':' || x END;

CREATE OR REPLACE TEMP MACRO rescore_hash(synopsis, genres, studio, episodes) AS  -- of the inputs as read
    sha256('rescore-v2|' || rescore_field(synopsis) || rescore_field(genres) || rescore_field(studio)
           || rescore_field(episodes));

CREATE OR REPLACE TEMP MACRO rescore_input_hash(synopsis, genres, studio, episodes) AS
    rescore_hash(rescore_synopsis(synopsis), rescore_genres(genres), rescore_studio(studio),
                 rescore_episodes(episodes));

-- The hash stores of schema versions 1 and 2 hold (rescore-v1: text as written, blank text
-- NULL), which bundles record of their training rows (anime_udf/comparison.py). A stored row
-- whose hash is its inputs' v1 hash is unchanged: the plan reuses it and the run stores its
-- new hash, so an old store moves to this hash without a row rescored.
CREATE OR REPLACE TEMP MACRO rescore_text_v1(x) AS
    CASE WHEN x IS NULL OR regexp_full_match(CAST(x AS VARCHAR), '[\s\p{Z}]*') THEN NULL
         ELSE CAST(x AS VARCHAR) END;

CREATE OR REPLACE TEMP MACRO rescore_episodes_v1(e) AS
    CASE WHEN e IS NULL OR NOT isfinite(CAST(e AS DOUBLE)) OR CAST(e AS DOUBLE) < 0
              OR CAST(e AS DOUBLE) <> round(CAST(e AS DOUBLE)) THEN NULL
         WHEN CAST(e AS DOUBLE) < 1e15 THEN CAST(CAST(e AS DOUBLE) AS BIGINT)::VARCHAR
         ELSE CAST(CAST(e AS DOUBLE) AS VARCHAR) END;

CREATE OR REPLACE TEMP MACRO rescore_input_hash_v1(synopsis, genres, studio, episodes) AS
    sha256('rescore-v1|' || rescore_field(rescore_text_v1(synopsis)) || rescore_field(rescore_text_v1(genres))
           || rescore_field(rescore_text_v1(studio)) || rescore_field(rescore_episodes_v1(episodes)));

CREATE OR REPLACE TEMP MACRO rescore_v1_hashed(schema_version) AS schema_version IN ('1', '2');

-- The catalog fingerprint is an order-independent aggregate, so that it can be computed
-- anywhere, in any order, in constant memory (the Spark rescoring sums on its executors):
-- the row count and the sum of each row's digest (60 bits of sha256 of key and input hash).
CREATE OR REPLACE TEMP MACRO rescore_row_digest(key, input_hash) AS
    ('0x' || substr(sha256(key || '=' || input_hash), 1, 15))::BIGINT;

CREATE OR REPLACE TEMP MACRO rescore_fingerprint(n, digest_sum) AS
    'sha256:' || substr(sha256('rescore-fingerprint-v2|' || n || '|' || CAST(digest_sum AS HUGEINT)), 1, 16);


-- @section schema
CREATE TABLE IF NOT EXISTS rescore_meta (
    name  VARCHAR PRIMARY KEY,
    value VARCHAR NOT NULL
);

CREATE TABLE IF NOT EXISTS rescore_scores (
    key        VARCHAR     NOT NULL,  -- the catalog key, as text
    model_id   VARCHAR     NOT NULL,  -- kind + hash of the bundle's contents
    model_kind VARCHAR     NOT NULL,
    input_hash VARCHAR     NOT NULL,  -- rescore_input_hash of the inputs it was scored from
    score      DOUBLE      NOT NULL,
    imputed    BOOLEAN     NOT NULL,  -- some input was missing and imputed
    run_id     VARCHAR     NOT NULL,  -- the run that scored it
    scored_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (key, model_id)
);

CREATE TABLE IF NOT EXISTS rescore_runs (
    run_id              VARCHAR     NOT NULL,
    started_at          TIMESTAMPTZ NOT NULL,
    finished_at         TIMESTAMPTZ NOT NULL,
    seconds             DOUBLE      NOT NULL,
    catalog             VARCHAR,
    catalog_fingerprint VARCHAR     NOT NULL,
    key_column          VARCHAR     NOT NULL,
    model_kind          VARCHAR     NOT NULL,
    model_id            VARCHAR     NOT NULL,
    bundle              VARCHAR,
    rows_seen           BIGINT      NOT NULL,
    rows_scored         BIGINT      NOT NULL,
    rows_reused         BIGINT      NOT NULL,
    rows_removed        BIGINT      NOT NULL,
    rows_superseded     BIGINT      NOT NULL,
    rows_imputed        BIGINT      NOT NULL,
    rows_stored         BIGINT      NOT NULL,
    score_mean          DOUBLE,
    score_std           DOUBLE,
    score_p05           DOUBLE,
    score_p25           DOUBLE,
    score_p50           DOUBLE,
    score_p75           DOUBLE,
    score_p95           DOUBLE,
    prev_run_id         VARCHAR,      -- the previous run of this kind; NULL on the first
    prev_model_id       VARCHAR,
    shift_mean          DOUBLE,       -- this run's figure minus the previous run's
    shift_std           DOUBLE,
    shift_p05           DOUBLE,
    shift_p25           DOUBLE,
    shift_p50           DOUBLE,
    shift_p75           DOUBLE,
    shift_p95           DOUBLE,
    PRIMARY KEY (run_id, model_kind)
);

-- Version 2: prediction intervals. A row stored before has none (NULL): a run with a
-- level computes them; a run without one keeps them where the row is not rescored.
ALTER TABLE rescore_scores ADD COLUMN IF NOT EXISTS level DOUBLE;  -- the interval's level
ALTER TABLE rescore_scores ADD COLUMN IF NOT EXISTS lo DOUBLE;
ALTER TABLE rescore_scores ADD COLUMN IF NOT EXISTS hi DOUBLE;
ALTER TABLE rescore_runs ADD COLUMN IF NOT EXISTS level DOUBLE;   -- the run's level, NULL: none
ALTER TABLE rescore_runs ADD COLUMN IF NOT EXISTS width_mean DOUBLE;  -- mean hi - lo of the stored rows at it
-- Why the run scored with its bundle: 'production' (the kind's alias), 'newest' (no alias
-- set), NULL (a bundle named by the caller); docs/promotion.md.
ALTER TABLE rescore_runs ADD COLUMN IF NOT EXISTS alias VARCHAR;
-- Version 3: input_hash is rescore_input_hash's, of the inputs as read (section macros); the
-- first run on a store of version 1 or 2 rewrites its v1 hashes.


-- @section start
SET VARIABLE rescore_run_id = coalesce(getvariable('rescore_run_id'),
    strftime(now() AT TIME ZONE 'UTC', '%Y%m%dT%H%M%SZ') || '-' || substr(md5(random()::VARCHAR), 1, 6));
SET VARIABLE rescore_started_at = coalesce(getvariable('rescore_started_at'), now());
SELECT error('rescore: SET VARIABLE rescore_key_column (the catalog column the store is keyed by) first')
WHERE getvariable('rescore_key_column') IS NULL;
SELECT error('rescore: the level ' || getvariable('rescore_level') || ' is not between 0 and 1')
WHERE NOT (CAST(getvariable('rescore_level') AS DOUBLE) > 0 AND CAST(getvariable('rescore_level') AS DOUBLE) < 1);
-- A store of schema version 1 or 2 holds v1 hashes (section macros): this run carries them over.
SET VARIABLE rescore_v1_hashes = (SELECT rescore_v1_hashed(value) FROM rescore_meta WHERE name = 'schema_version');
CREATE OR REPLACE TEMP TABLE rescore_models (
    model_id   VARCHAR NOT NULL PRIMARY KEY,
    model_kind VARCHAR NOT NULL UNIQUE,
    bundle     VARCHAR,
    alias      VARCHAR
);


-- @section model
-- Once per model to rescore, with rescore_model_id / rescore_model_kind set.
SELECT error('rescore: SET VARIABLE rescore_model_id and rescore_model_kind first')
WHERE getvariable('rescore_model_id') IS NULL OR getvariable('rescore_model_kind') IS NULL;
INSERT INTO rescore_models
VALUES (getvariable('rescore_model_id'), getvariable('rescore_model_kind'), getvariable('rescore_bundle'),
        getvariable('rescore_alias'));


-- @section input
-- The catalog with its input hashes (rescore_input_hash: genres and studio, which repeat, read
-- once per distinct value), whether an input is missing, and, where the store holds v1
-- hashes, each row's v1 hash. The Spark rescoring runs it on its workers, a batch at a time.
CREATE OR REPLACE TEMP TABLE rescore_input AS
WITH genres AS (SELECT genres, rescore_genres(genres) AS genres_read FROM (SELECT DISTINCT genres FROM rescore_catalog)),
     studios AS (SELECT studio, rescore_studio(studio) AS studio_read FROM (SELECT DISTINCT studio FROM rescore_catalog)),
     rows_read AS (
    SELECT c.*, rescore_synopsis(c.synopsis) AS synopsis_read, g.genres_read, s.studio_read,
           rescore_episodes(c.episodes) AS episodes_read
    FROM rescore_catalog c
    JOIN genres g ON c.genres IS NOT DISTINCT FROM g.genres
    JOIN studios s ON c.studio IS NOT DISTINCT FROM s.studio)
SELECT CAST(key AS VARCHAR) AS key, key AS catalog_key, synopsis, genres, studio, episodes,
       rescore_hash(synopsis_read, genres_read, studio_read, episodes_read) AS input_hash,
       synopsis_read IS NULL OR genres_read IS NULL OR studio_read IS NULL OR episodes_read IS NULL AS imputed,
       CASE WHEN getvariable('rescore_v1_hashes') THEN rescore_input_hash_v1(synopsis, genres, studio, episodes)
       END AS v1_hash
FROM rows_read;


-- @section checks
-- Every row has a key, no key occurs twice, and the store is keyed by the same column. Reads
-- only rescore_input and rescore_meta: the Spark rescoring runs it over its Parquet files.
SELECT error('rescore: the catalog key ' || getvariable('rescore_key_column') || ' is NULL in '
             || count(*) || ' row(s); every row needs a key')
FROM rescore_input WHERE key IS NULL HAVING count(*) > 0;

SELECT error('rescore: the catalog key ' || getvariable('rescore_key_column') || ' is not unique: '
             || key || ' occurs ' || n || ' times')
FROM (SELECT key, count(*) AS n FROM rescore_input GROUP BY key HAVING count(*) > 1 ORDER BY n DESC, key LIMIT 1);

SELECT error('rescore: this store keys its rows by ' || value || ', not by '
             || getvariable('rescore_key_column') || '; use --key ' || value || ' or another store')
FROM rescore_meta WHERE name = 'key_column' AND value <> getvariable('rescore_key_column');


-- @section plan
-- The rows each model must score: new keys, keys whose inputs changed since that model
-- scored them (a stored v1 hash of the same inputs is no change), and, in a run with a level,
-- keys without an interval at that level (keys and hashes only: the inputs stay in
-- rescore_input, read again when scoring).
CREATE OR REPLACE TEMP TABLE rescore_todo AS
SELECT m.model_id, i.key, i.input_hash, i.imputed
FROM rescore_models m
CROSS JOIN rescore_input i
LEFT JOIN rescore_scores s ON s.model_id = m.model_id AND s.key = i.key
WHERE NOT coalesce(s.input_hash IN (i.input_hash, i.v1_hash), false)
   OR (getvariable('rescore_level') IS NOT NULL AND s.level IS DISTINCT FROM getvariable('rescore_level'));

CREATE OR REPLACE TEMP TABLE rescore_new (
    model_id VARCHAR NOT NULL,
    key      VARCHAR NOT NULL,
    score    DOUBLE,
    lo       DOUBLE,  -- the interval at the run's level; NULL without one
    hi       DOUBLE
);


-- @section fingerprint
-- One hash of every key and its input hash (the macros above). Sections counts and record
-- read only the tables they name: the Spark rescoring (anime_udf/rescore/on_spark.py) runs
-- them over its snapshot's Parquet files, and computes the fingerprint's sum on Spark.
SET VARIABLE rescore_catalog_fingerprint = (
    SELECT rescore_fingerprint(count(*), coalesce(sum(rescore_row_digest(key, input_hash)), 0))
    FROM rescore_input);


-- @section score
-- The slow step, and the only one outside SQL in the CLI (same scorer, chunked).
INSERT INTO rescore_new
SELECT t.model_id, t.key, rescore_predict(i.synopsis, i.genres, i.studio, i.episodes), NULL, NULL
FROM rescore_todo t JOIN rescore_input i USING (key)
WHERE getvariable('rescore_level') IS NULL;

INSERT INTO rescore_new
SELECT model_id, key, rescore_predict(synopsis, genres, studio, episodes), interval.lo, interval.hi
FROM (SELECT t.model_id, t.key, i.synopsis, i.genres, i.studio, i.episodes,
             rescore_interval(i.synopsis, i.genres, i.studio, i.episodes, getvariable('rescore_level')) AS interval
      FROM rescore_todo t JOIN rescore_input i USING (key)
      WHERE getvariable('rescore_level') IS NOT NULL);


-- @section begin
BEGIN TRANSACTION;


-- @section counts
CREATE OR REPLACE TEMP TABLE rescore_counts AS
SELECT m.model_id, m.model_kind, m.bundle, m.alias,
       (SELECT count(*) FROM rescore_input) AS rows_seen,
       (SELECT count(*) FROM rescore_todo t WHERE t.model_id = m.model_id) AS rows_scored,
       (SELECT count(*) FROM rescore_input) - (SELECT count(*) FROM rescore_todo t WHERE t.model_id = m.model_id)
           AS rows_reused,
       -- keys gone from the catalog (the same for every model of a run): each loses its
       -- rows of every kind, the kinds this run does not score included
       (SELECT count(DISTINCT s.key) FROM rescore_scores s
         WHERE s.key NOT IN (SELECT key FROM rescore_input)) AS rows_removed,
       (SELECT count(*) FROM rescore_scores s
         WHERE s.model_kind = m.model_kind AND s.model_id <> m.model_id) AS rows_superseded,
       (SELECT count(*) FROM rescore_input WHERE imputed) AS rows_imputed
FROM rescore_models m;


-- @section apply
-- Every row to score has a finite score (and, in a run with a level, an interval around
-- it), or nothing is applied.
SELECT error('rescore: ' || count(*) || ' row(s) to score have no finite score, or no interval holding it; nothing was applied')
FROM rescore_todo t LEFT JOIN rescore_new n USING (model_id, key)
WHERE n.score IS NULL OR NOT isfinite(n.score)
   OR (getvariable('rescore_level') IS NOT NULL AND NOT coalesce(n.lo <= n.score AND n.score <= n.hi, false))
HAVING count(*) > 0;

-- Keys gone from the catalog (a key gone has no score of any kind, so every kind's
-- rows go, not only the chosen models'), and rows of an older bundle of the same kind.
DELETE FROM rescore_scores
WHERE key NOT IN (SELECT key FROM rescore_input);

DELETE FROM rescore_scores
WHERE model_kind IN (SELECT model_kind FROM rescore_models)
  AND model_id NOT IN (SELECT model_id FROM rescore_models);

-- Rows stored with their inputs' v1 hash, of every kind, take the new hash (section macros).
UPDATE rescore_scores SET input_hash = i.input_hash, imputed = i.imputed
FROM rescore_input i
WHERE getvariable('rescore_v1_hashes') AND rescore_scores.key = i.key AND rescore_scores.input_hash = i.v1_hash;

INSERT OR REPLACE INTO rescore_scores
    (key, model_id, model_kind, input_hash, score, imputed, run_id, scored_at, level, lo, hi)
SELECT t.key, t.model_id, m.model_kind, t.input_hash, n.score, t.imputed, getvariable('rescore_run_id'), now(),
       getvariable('rescore_level'), n.lo, n.hi
FROM rescore_todo t
JOIN rescore_new n USING (model_id, key)
JOIN rescore_models m USING (model_id);

INSERT OR REPLACE INTO rescore_meta
VALUES ('schema_version', '3'), ('key_column', getvariable('rescore_key_column'));

-- @section record
-- The run record: counts, the score distribution of each model's stored rows, and its
-- shift against the previous run of that kind; the run's level and the mean width of the
-- stored intervals at it.
-- A retry of a run whose COMMIT failed reuses its run id: if that COMMIT took effect
-- after all, its record stays the only one.
INSERT OR IGNORE INTO rescore_runs
WITH stats AS (
    SELECT model_id, count(*) AS n, avg(score) AS mean, stddev_pop(score) AS std,
           quantile_cont(score, [0.05, 0.25, 0.5, 0.75, 0.95]) AS q,
           avg(hi - lo) FILTER (level = getvariable('rescore_level')) AS width_mean
    FROM rescore_scores
    WHERE model_id IN (SELECT model_id FROM rescore_models)
    GROUP BY model_id
),
prev AS (
    SELECT * FROM rescore_runs
    QUALIFY row_number() OVER (PARTITION BY model_kind ORDER BY finished_at DESC, run_id DESC) = 1
)
SELECT getvariable('rescore_run_id'), getvariable('rescore_started_at'), now(),
       greatest(epoch(now()) - epoch(getvariable('rescore_started_at')::TIMESTAMPTZ), 0),
       getvariable('rescore_catalog'), getvariable('rescore_catalog_fingerprint'),
       getvariable('rescore_key_column'),
       c.model_kind, c.model_id, c.bundle,
       c.rows_seen, c.rows_scored, c.rows_reused, c.rows_removed, c.rows_superseded, c.rows_imputed,
       coalesce(s.n, 0),
       s.mean, s.std, s.q[1], s.q[2], s.q[3], s.q[4], s.q[5],
       p.run_id, p.model_id,
       s.mean - p.score_mean, s.std - p.score_std,
       s.q[1] - p.score_p05, s.q[2] - p.score_p25, s.q[3] - p.score_p50,
       s.q[4] - p.score_p75, s.q[5] - p.score_p95,
       getvariable('rescore_level'), s.width_mean, c.alias
FROM rescore_counts c
LEFT JOIN stats s USING (model_id)
LEFT JOIN prev p ON p.model_kind = c.model_kind;


-- @section commit
COMMIT;


-- @section export
-- What `--export` writes (the CLI renames key to the key column, and refuses a key
-- column named like one of the others): every stored score of a key in the catalog,
-- with the key in its catalog type; up_to_date is false for a model kind not rescored
-- since its inputs changed.
SELECT i.catalog_key AS key, s.model_kind AS model, s.model_id, s.score, s.imputed AS imputed_inputs,
       s.input_hash = i.input_hash AS up_to_date, s.input_hash, s.run_id, s.scored_at, s.level, s.lo, s.hi
FROM rescore_scores s
JOIN rescore_input i USING (key)
ORDER BY model, s.key
