-- Fails (returns a row) unless each model's MAE and RMSE on the catalog's scored rows beat
-- predicting every row as their mean score: the metric macros of sql/metrics.sql.
with scored as (
    select a.score, s.baseline, s.fusion, avg(a.score) over () as mean_score
    from {{ ref('anime_scores') }} s
    join {{ source('warehouse', 'anime') }} a using (anime_id)
    where a.score is not null
),
metrics as (
    select mae(score, baseline) as mae_baseline, mae(score, fusion) as mae_fusion, mae(score, mean_score) as mae_mean,
           rmse(score, baseline) as rmse_baseline, rmse(score, fusion) as rmse_fusion,
           rmse(score, mean_score) as rmse_mean
    from scored
)
select * from metrics
where mae_baseline >= mae_mean or mae_fusion >= mae_mean or rmse_baseline >= rmse_mean or rmse_fusion >= rmse_mean
