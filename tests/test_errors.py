"""The one-line forms of messages and exceptions that every error line of the pipeline is made of."""

from __future__ import annotations

from resnet.errors import first_line, one_line


def test_one_line_collapses_every_whitespace_run():
    assert one_line("a\n  b\tc \n") == "a b c"
    assert one_line(ValueError("bad\nvalue")) == "bad value"


def test_first_line_is_the_first_non_empty_line_typed_or_cut_on_request():
    err = RuntimeError("\n  Error(s) in loading state_dict:\n\tMissing key(s): fc.weight\n")
    assert first_line(err) == "Error(s) in loading state_dict:"
    assert first_line(err, typed=True) == "RuntimeError: Error(s) in loading state_dict:"
    assert first_line(KeyError()) == "KeyError"  # says nothing: its type
    assert first_line(ValueError("x" * 200), limit=160) == "x" * 157 + "..."
