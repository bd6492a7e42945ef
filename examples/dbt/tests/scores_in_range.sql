-- Fails (returns rows) where a score is outside the models' range [1, 10].
select anime_id, baseline, fusion
from {{ ref('anime_scores') }}
where not (baseline between 1 and 10 and fusion between 1 and 10)
