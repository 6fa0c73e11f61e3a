"""How zsclip writes text it did not choose itself (file names above all) without losing or forging
anything.

On Linux a file name is bytes, not text. Python hands such names over as str, with each byte that
is not valid UTF-8 carried as a lone surrogate U+DC80..U+DCFF ("surrogateescape"), and opening that
str opens the same file again. Each way out of zsclip treats them on purpose:

* JSON (jsonl rows, embedding files): the output stays valid UTF-8 and the surrogates are written as
  JSON escapes, `\\udcNN` for the byte 0xNN. Python's json.loads gives the exact str back, so
  `open(row["path"])` and `os.fsencode(row["path"])` work unchanged; jq shows U+FFFD for them.
* csv and tsv: such a byte is written as the four characters `\\xNN`, so the file stays valid UTF-8
  for spreadsheets and pandas. This is for reading, not for getting the bytes back: use jsonl for that.
* people (stderr lines, the table, the HTML report): the same `\\xNN`, and control characters
  (newline, escape, ...) and the invisible bidirectional overrides as escapes too, so that a name
  can neither start a line of its own (forging `zsclip: error:`) nor drive the terminal.
"""

from __future__ import annotations

import json
import re
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")
# C0 controls, DEL, C1 controls, line/paragraph separators, bidirectional embeddings/overrides/isolates
_UNSHOWABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _surrogate_json(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"


def _byte_or_code(match: re.Match) -> str:
    """`\\xNN` for a byte carried by surrogateescape or a code point below 256, else `\\uNNNN`."""
    char = match.group()
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def json_text(value: Any, **options: Any) -> str:
    """json.dumps for files zsclip writes as UTF-8: non-ASCII kept as is, lone surrogates (undecodable
    bytes of a file name) as `\\udcNN` escapes, so the text always encodes."""
    text = json.dumps(value, ensure_ascii=False, **options)
    # A lone surrogate can only stand inside a string literal, where its escape means the same.
    return _SURROGATE.sub(_surrogate_json, text)


def csv_text(text: str) -> str:
    """A field for csv/tsv: valid UTF-8, undecodable bytes of a name as `\\xNN` (quoting does the
    rest)."""
    return _SURROGATE.sub(_byte_or_code, text) if _SURROGATE.search(text) else text


def for_display(text: str) -> str:
    """Text for a person's terminal: one line, nothing the terminal would act on."""
    return _UNSHOWABLE.sub(_byte_or_code, text) if _UNSHOWABLE.search(text) else text
