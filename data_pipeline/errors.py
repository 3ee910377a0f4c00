"""The one exception the data pipeline raises for bad input; its message names the file and the fix. And the check,
shared by the JSON lines readers, for text that JSON can carry but UTF-8 cannot."""

import re


class DataError(ValueError):
    """Unusable data (missing, corrupt, mismatched, undecodable): the message names the file and the fix."""


# A JSON escape of a surrogate, \uD800 to \uDFFF (or the text `\ud...` after an escaped backslash: a false alarm).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD]")


def lone_surrogate(text: str, raw: bytes) -> str | None:
    """What is wrong with `text`, a string of the JSON line `raw`, if it holds half of a UTF-16 surrogate pair; else
    None. JSON can write one (`"\\ud800"`), but it is no character: UTF-8, and so sentencepiece, cannot encode it.

    Nearly free on the way to that answer: an ASCII string (str.isascii is a flag, not a scan) holds none, and
    since the line was decoded as strict UTF-8 only a `\\uD...` escape in it makes one; only a line with such an
    escape (a valid pair, as json.dumps writes emoji, or a lone half) pays for an encode of `text`."""
    if text.isascii() or not _SURROGATE_ESCAPE.search(raw):
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"{ascii(text[e.start])[1:-1]} at character {e.start}, half of a UTF-16 surrogate pair"
    return None
