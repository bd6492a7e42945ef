-- The nightly job: only new rows and rows whose inputs changed are scored. A row's inputs
-- are compared by rescore_input_hash, the macro of sql/rescore.sql that `anime-udf rescore`
-- uses (registered by the anime_udf.dbt plugin), so both agree on what changed.
-- Keys gone from the catalog are deleted after each run. A new model bundle is not a
-- change of the inputs: after retraining, run `dbt build --full-refresh`.
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
       predict_score(c.synopsis, c.genres, c.studio, c.episodes)        as baseline,
       predict_score_fusion(c.synopsis, c.genres, c.studio, c.episodes) as fusion,
       '{{ invocation_id }}'                                            as scored_by_invocation,
       now()                                                            as scored_at
from catalog c
{% if is_incremental() %}
where not exists (
    select 1 from {{ this }} t where t.anime_id = c.anime_id and t.input_hash = c.input_hash
)
{% endif %}
