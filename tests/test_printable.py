"""Text that came from inside a sandbox is escaped before it is printed."""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from nsbuild.printable import printable


def test_terminal_sequences_are_shown_not_obeyed() -> None:
    assert printable("a\x1b[2Kb\x1b]0;title\x07c") == "a\\x1b[2Kb\\x1b]0;title\\x07c"
    assert printable("x\ny\rz\t") == "x\\ny\\rz\\t"
    assert printable("\x9b31m") == "\\x9b31m"
    assert printable("evil\u202etxt.exe") == "evil\\u202etxt.exe"


def test_undecodable_bytes_and_backslashes_are_unambiguous() -> None:
    assert printable(b"a\xff".decode("utf-8", "surrogateescape")) == "a\\xff"
    assert printable("a\\x1b") == "a\\\\x1b"


def test_long_text_is_cut() -> None:
    assert printable("a" * 600, limit=10) == "a" * 10 + "..."


@given(st.text())
def test_nothing_unprintable_survives(text: str) -> None:
    out = printable(text, limit=10_000)
    assert not [ch for ch in out if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp")], out
    assert not set(out) & set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
