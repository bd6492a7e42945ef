"""The catalog's column names, in a module light enough for the CLI's option lists."""

SYNOPSIS, GENRES, STUDIO, EPISODES = "synopsis", "genres", "studio", "episodes"
INPUT_COLUMNS = (SYNOPSIS, GENRES, STUDIO, EPISODES)  # the models' inputs, in call order
SCORE_COLUMN = "score"  # the target
DEFAULT_KEY = "anime_id"  # what identifies a row for the nightly rescoring
SCORE_MIN, SCORE_MAX = 1.0, 10.0  # a MyAnimeList score's range: every score and interval is clamped to it
