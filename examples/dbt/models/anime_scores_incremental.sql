-- The nightly job: only new rows, rows whose inputs changed and rows scored by other bundles
-- are scored. A row's inputs are compared by rescore_input_hash, the macro of sql/rescore.sql
-- that `anime-udf rescore` uses, and its bundles by anime_udf_model_ids() (both registered
-- by the anime_udf.dbt plugin), so dbt and rescore agree on what changed.
-- Keys gone from the catalog are deleted after each run.
{{ config(
    materialized='incremental',
    unique_key='anime_id',
    incremental_strategy='delete+insert',
    post_hook="delete from {{ this }} where anime_id not in (select anime_id from {{ source('warehouse', 'anime') }})"
) }}

with catalog as (
    select anime_id, synopsis, genres, studio, episodes,
           rescore_input_hash(synopsis, genres, studio, episodes) as input_hash
    from {{ source('warehouse', 'anime') }}
)
select c.anime_id,
       c.input_hash,
       anime_udf_model_ids()                                            as model_ids,
       predict_score(c.synopsis, c.genres, c.studio, c.episodes)        as baseline,
       predict_score_fusion(c.synopsis, c.genres, c.studio, c.episodes) as fusion,
       '{{ invocation_id }}'                                            as scored_by_invocation,
       now()                                                            as scored_at
from catalog c
{% if is_incremental() %}
where not exists (
    select 1 from {{ this }} t
    where t.anime_id = c.anime_id and t.input_hash = c.input_hash and t.model_ids = anime_udf_model_ids()
)
{% endif %}
