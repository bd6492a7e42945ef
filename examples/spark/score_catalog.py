"""Score a Parquet catalog on a Spark cluster, as a job that spark-submit runs (docs/spark.md):

    spark-submit --master spark://HOST:7077 \
        --conf spark.executorEnv.ANIME_UDF_CACHE=/local-disk/anime-udf \
        --conf spark.executorEnv.HF_HUB_OFFLINE=1 \
        examples/spark/score_catalog.py catalog.parquet scored/ --models models

The catalog as it is plus one column per model (predict_score, predict_score_fusion) is
written to the Parquet directory OUT; the bundles of the models directory are shipped to
every executor. spark-submit's --master and --conf settings are the session's.
"""

import argparse

from pyspark.sql import SparkSession

from anime_udf.spark import score_parquet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("catalog", help="a Parquet file, directory or glob with synopsis, genres, studio, episodes")
    parser.add_argument("out", help="the Parquet directory to write")
    parser.add_argument("--models", default="models", help="the models directory (default: ./models)")
    args = parser.parse_args()
    spark = SparkSession.builder.appName("anime-udf score").getOrCreate()  # spark-submit's settings
    try:
        scored = score_parquet(spark, args.catalog, args.out, models_dir=args.models, ship=True)
        print(scored.summary(args.out, " on Spark"))
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
