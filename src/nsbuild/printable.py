"""Escaping of text that came from inside a sandbox before it is printed.

Names, paths and messages a sandbox made (DNS questions, file names in a
``.changes``, a testbed's error output) may hold terminal control sequences
that would rewrite the user's screen or title. Every such string goes through
:func:`printable` before it reaches a terminal or a one-line message. This
module imports nothing, so every layer may use it.
"""

from __future__ import annotations

# C0 and C1 control characters, DEL, and the Unicode line and paragraph
# separators and bidirectional overrides, which reorder what a terminal shows.
_BIDI = frozenset("\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


# The longest error message nsbuild prints: long enough for a list of unmet
# dependencies, short enough for a terminal.
MESSAGE_LIMIT = 4096


def _unsafe(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or 0x7F <= code < 0xA0 or ch in _BIDI or 0xDC80 <= code <= 0xDCFF


def printable(text: str, limit: int = 512) -> str:
    """*text* with every control character as a visible escape (``\\x1b``,
    ``\\n``, ``\\u202e``; undecodable bytes kept by ``surrogateescape`` as
    ``\\x..``) and a backslash doubled, cut to *limit* characters with an
    ellipsis, so it can be printed on one line and read back unambiguously."""
    out = []
    for ch in text[:limit]:
        if ch == "\\":
            out.append("\\\\")
        elif not _unsafe(ch):
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    if len(text) > limit:
        out.append("...")
    return "".join(out)
