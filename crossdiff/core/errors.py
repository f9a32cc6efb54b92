"""User-facing errors: one line saying what is wrong and how to fix it.

The CLI prints `error: <message>` and exits with status 2 for these; anything else is a bug and
keeps its traceback.
"""


class CrossdiffError(Exception):
    """A problem with the user's input or environment, explained in one line."""
