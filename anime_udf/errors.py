"""The one base of the errors a user can act on (bad input, a broken bundle, a busy store).

Kept free of heavy imports, so that the CLI can recognise every such error without
importing torch: it reports them as one line, never as a traceback."""


class AnimeUdfError(Exception):
    """An error with a message meant for the user."""
