"""lorafit's own JSON and JSONL reader: records with their place ('file:line', 'file[index]'), gzip or not.

Kept rather than pyarrow's JSON reader because its errors name the line and the field, and because it
explains what Python's parser refuses (nesting depth, integer size). JSONL is read a line at a time, so
memory stays flat however long the file is; a JSON list is parsed whole (that is what the format allows).
"""

from __future__ import annotations

import gzip
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from lorafit.errors import LorafitError

GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"  # editors on Windows like to add a byte-order mark
_JSON_SPACE = b" \t\r\n"


def open_bytes(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when it is gzip (told by its first two bytes, not its name)."""
    handle = open(path, "rb")  # noqa: SIM115  returned open, for the caller's with-block
    if handle.read(2) == GZIP_MAGIC:
        handle.close()
        return gzip.open(path, "rb")
    handle.seek(0)
    return handle


def first_character(path: Path) -> bytes:
    """The first byte that is not JSON whitespace or a byte-order mark, b"" for a blank file."""
    with open_bytes(path) as handle:
        chunk = handle.read(1 << 16).removeprefix(UTF8_BOM)
        while chunk:
            stripped = chunk.lstrip(_JSON_SPACE)
            if stripped:
                return stripped[:1]
            chunk = handle.read(1 << 16)
    return b""


def json_kind(path: Path) -> str:
    """'json' for a JSON list (its first character is '['), else 'jsonl': told by content, as users expect."""
    return "json" if first_character(path) == b"[" else "jsonl"


def jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    """Each non-blank line's value with 'file:line'. Lines end at b"\\n" only: JSON allows U+2028 in strings."""
    first = True
    with open_bytes(path) as handle:
        for number, raw in enumerate(handle, start=1):
            line = _decode_line(path, number, raw.removeprefix(UTF8_BOM) if number == 1 else raw)
            if not line.strip():
                continue
            yield f"{path}:{number}", _parse_line(path, number, line, first)
            first = False


def _decode_line(path: Path, number: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LorafitError(
            f"{path}:{number}: not valid UTF-8 (byte 0x{raw[err.start]:02x}); re-save the file as UTF-8"
        ) from None


def _parse_line(path: Path, number: int, line: str, first: bool) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        # a pretty-printed single object fails on its first line; only then is the whole file worth a look
        if first and _is_one_json_object(path):
            raise LorafitError(
                f"{path}: the file holds a single JSON object; expected one object per line "
                "(JSONL) or a JSON list of objects"
            ) from None
        raise LorafitError(f"{path}:{number}: malformed JSON: {err.msg} (column {err.colno})") from None
    except (RecursionError, ValueError) as err:
        raise LorafitError(f"{path}:{number}: {_beyond_parser_limits(err)}") from None


def _is_one_json_object(path: Path) -> bool:
    try:
        with open_bytes(path) as handle:
            return isinstance(json.loads(handle.read().removeprefix(UTF8_BOM)), dict)
    except (RecursionError, ValueError):  # ValueError includes JSONDecodeError and UnicodeDecodeError
        return False


def json_list_records(path: Path) -> Iterator[tuple[str, object]]:
    """The elements of a JSON list with 'file[index]'; the list is parsed whole."""
    text = _read_utf8(path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise LorafitError(f"{path}:{err.lineno}: malformed JSON: {err.msg} (column {err.colno})") from None
    except (RecursionError, ValueError) as err:
        raise LorafitError(f"{_locate_refused_record(path, text)}: {_beyond_parser_limits(err)}") from None
    for index, record in enumerate(records):
        yield f"{path}[{index}]", record


def _read_utf8(path: Path) -> str:
    with open_bytes(path) as handle:
        raw = handle.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise LorafitError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x}); re-save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def _beyond_parser_limits(err: Exception) -> str:
    """Why Python's JSON parser refused valid JSON: it recurses once per nesting level and caps integer size."""
    if isinstance(err, RecursionError):
        return "a value is nested too deeply for Python's JSON parser (its recursion limit); flatten it"
    if "integer string conversion" in str(err):
        return (
            f"an integer has more than {sys.get_int_max_str_digits()} digits, the most Python's JSON parser "
            "reads; write it as a string"
        )
    return f"Python's JSON parser refused it: {err}"


def _locate_refused_record(path: Path, text: str) -> str:
    """'file:line: record [i]' for the list element the parser refuses, found by parsing one element at a time.

    The parser reports no position for a RecursionError or an oversized integer, so the elements before
    the refused one are decoded again to find where it starts; just the file when that fails too.
    """
    decoder = json.JSONDecoder()
    position, index = _skip_json_space(text, text.index("[") + 1), 0
    while position < len(text) and text[position] != "]":
        start = position
        try:
            _, position = decoder.raw_decode(text, start)
        except (RecursionError, ValueError):
            return f"{path}:{text.count(chr(10), 0, start) + 1}: record [{index}]"
        position = _skip_json_space(text, position)
        if not text.startswith(",", position):
            break
        position, index = _skip_json_space(text, position + 1), index + 1
    return str(path)


def _skip_json_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\n\r":
        position += 1
    return position
