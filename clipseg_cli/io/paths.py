"""Paths as text: file names that need not be valid UTF-8, shown safely and read back.

On Linux a file name is a byte string that need not be valid UTF-8. Such names are kept as
``str`` decoded with ``os.fsdecode`` (undecodable bytes become lone surrogates U+DC80..U+DCFF),
so :class:`~pathlib.Path` objects always reopen the original file. Those strings cannot be
written to UTF-8 text (JSON, logs, terminals): :func:`display_path` renders them safely and
:func:`parse_display_path` inverts it. Standard library only.
"""

from __future__ import annotations

import os


def display_path(p: str | os.PathLike[str]) -> str:
    """Render a path as a string that is always valid UTF-8 (safe for JSON and terminals).

    Encoding: every literal backslash becomes ``\\\\``; every byte that was not valid UTF-8 in
    the original name (held as a surrogate escape U+DC80..U+DCFF) becomes ``\\xNN`` with two
    lowercase hex digits; any other lone surrogate becomes ``\\uXXXX``. Everything else is kept
    as is. Because backslashes are always escaped, the mapping is reversible with
    :func:`parse_display_path`.
    """
    return escape_undecodable(os.fspath(p), double_backslashes=True)


def escape_undecodable(text: str, *, double_backslashes: bool = False) -> str:
    """``text`` with surrogate escapes written as ``\\xNN`` / ``\\uXXXX`` (valid UTF-8).

    :func:`display_path` doubles backslashes too, so paths can be parsed back; free text (error
    messages) keeps its backslashes as they are.
    """
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if ch == "\\" and double_backslashes:
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def parse_display_path(s: str) -> str:
    """Invert :func:`display_path`: the path string that reopens the original file.

    Raises:
        ValueError: ``s`` contains a backslash sequence that :func:`display_path` never makes.
    """
    out: list[str] = []
    i = 0
    while i < len(s):
        ch = s[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = s[i + 1 : i + 2]
        if nxt == "\\":
            out.append("\\")
            i += 2
        elif nxt == "x" and len(s) >= i + 4:
            out.append(chr(0xDC00 + int(s[i + 2 : i + 4], 16)))
            i += 4
        elif nxt == "u" and len(s) >= i + 6:
            out.append(chr(int(s[i + 2 : i + 6], 16)))
            i += 6
        else:
            raise ValueError(f"bad escape at offset {i} in display path {s!r}")
    return "".join(out)
