"""The one base of the errors a user can act on (bad input, a broken bundle, a busy store).

Kept free of heavy imports, so that the CLI can recognise every such error without
importing torch: it reports them as one line, never as a traceback."""


# The CLI's exit codes (docs/errors.md): a run that failed, a command used wrongly (click's own
# code for a bad option), and a store or database that another process holds (sysexits.h's
# EX_TEMPFAIL: try again later).
EXIT_FAILED, EXIT_USAGE, EXIT_BUSY = 1, 2, 75


class AnimeUdfError(Exception):
    """An error with a message meant for the user."""

    exit_code = EXIT_FAILED


class OptionError(AnimeUdfError, ValueError):
    """A command's option or argument (``option``, e.g. ``--out``) that the library refuses before
    any work: the CLI says it as click says a bad option, under the command's usage, and exits 2."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option
