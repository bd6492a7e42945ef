"""Training modules: fit the models and write bundles that anime_udf scores with."""
