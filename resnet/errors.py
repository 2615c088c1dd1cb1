"""Errors a user can fix: the CLI prints their message as one line and exits non-zero, without a traceback."""


class PipelineError(Exception):
    """Bad input (a file, a key, a value): the message names it and says what was expected."""


class DataError(PipelineError):
    """A dataset that cannot be read or prepared."""
