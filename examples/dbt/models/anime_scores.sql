-- Every row of the catalog scored by both models, rebuilt on each `dbt build`.
{{ config(materialized='table') }}

select anime_id,
       predict_score(synopsis, genres, studio, episodes)        as baseline,
       predict_score_fusion(synopsis, genres, studio, episodes) as fusion
from {{ source('warehouse', 'anime') }}
