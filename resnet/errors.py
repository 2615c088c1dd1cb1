"""Errors a user can fix: the CLI prints their message as one line and exits non-zero, without a traceback."""


class PipelineError(Exception):
    """Bad input (a file, a key, a value): the message names it and says what was expected."""


class DataError(PipelineError):
    """A dataset that cannot be read or prepared."""


def one_line(value: object) -> str:
    """`value` (a message, an exception) as one line: its whitespace, newlines included, collapsed."""
    return " ".join(str(value).split())


def first_line(exc: BaseException, *, typed: bool = False, limit: int | None = None) -> str:
    """An exception's first non-empty line, for a message of one line: prefixed by its type when `typed`, its
    type alone when it says nothing, cut to `limit` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    name = type(exc).__name__
    line = (f"{name}: {lines[0]}" if typed else lines[0]) if lines else name
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."
