"""Streaming reader for JSON-lines data files (plain or gzip-compressed) with located errors."""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from pathlib import Path
from typing import Any, Iterator

from nemo_aligner.errors import MissingFileError, UserError


class DataFormatError(UserError, ValueError):
    """A record in a data file is malformed.

    ``str(err)`` is ``"{path}:{line_no}: field '{field}': {message}"`` (or
    ``"{path}:{line_no}: {message}"`` when ``field`` is None), so the offending
    line can be opened directly from the message. An error about the whole file
    (not gzip data, no records at all) has no line: ``"{path}: {message}"``.

    Attributes:
        path: the data file (as given).
        line_no: 1-based line number in that file, or None for an error of the whole file.
        field: name of the offending field, or None when the whole line is at fault.
        message: what is wrong.
    """

    def __init__(self, path: str | os.PathLike, line_no: int | None, field: str | None, message: str):
        self.path = path
        self.line_no = line_no
        self.field = field
        self.message = message
        where = f"{path}: " if line_no is None else f"{path}:{line_no}: "
        super().__init__(where + (message if field is None else f"field '{field}': {message}"))

    def __reduce__(self):
        # Keeps the error picklable (e.g. when raised inside a worker process).
        return (type(self), (self.path, self.line_no, self.field, self.message))


GZIP_MAGIC = b"\x1f\x8b"
"""The first two bytes of every gzip file."""

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
"""A JSON ``\\uD800``-``\\uDFFF`` escape: the only way a line can hold a lone UTF-16 surrogate (raw UTF-8 bytes
cannot encode one, and a valid escaped pair is joined into one character by the decoder)."""


def _open_lines(path: Path):
    """Open ``path`` for binary line iteration, decompressing when the name ends in ``.gz``."""
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def iter_jsonl(path: str | os.PathLike, allow_empty: bool = False) -> Iterator[tuple[int, dict]]:
    """Stream the JSON objects of a JSON-lines file, one line at a time.

    Files whose name ends in ``.gz`` (e.g. ``train.jsonl.gz``) are decompressed on the
    fly; anything else (``.jsonl``, ``.json`` with one object per line) is read as is.
    Blank lines are skipped. Only one line is held in memory at a time.

    Args:
        path: the file to read.
        allow_empty: yield nothing for a file without records instead of raising.

    Returns:
        An iterator of ``(line_no, record)`` with ``line_no`` 1-based (blank lines count).

    Raises:
        FileNotFoundError: ``path`` does not exist or is a directory (raised immediately, not on first ``next``).
        DataFormatError: while iterating, for a line that is not valid UTF-8, not valid
            JSON (the message gives the column within the line and the decoder's error), nested too deeply to decode,
            not a JSON object, or holding a string with a lone UTF-16 surrogate (``"\\ud800"``,
            not encodable as UTF-8; the field is named); for a ``.gz`` file that is not gzip data
            (no line), or whose gzip data is truncated or corrupt (the line where reading
            stopped); at the end, for a file without any record (empty, or blank lines only; no line),
            unless ``allow_empty``. Never a raw ``EOFError``/``OSError``/``zlib.error``/``RecursionError``.
    """
    path = Path(path)
    require_data_file(path, f"JSON-lines data file not found: {path} (resolved to {path.absolute()})")
    return _iter_records(path, allow_empty)


def require_data_file(path: Path, missing_message: str) -> None:
    """Check that the data file ``path`` exists and is a file.

    Raises:
        MissingFileError: ``path`` is a directory (the message says so and names up to 3 JSON-lines files in it),
            or does not exist (``missing_message``).
    """
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")))
        inside = f" (it holds {', '.join(found[:3])}{', ...' if len(found) > 3 else ''})" if found else ""
        raise MissingFileError(f"data file {path} is a directory{inside}; give the path of a JSON-lines file "
                               "(.jsonl or .jsonl.gz) instead")
    if not path.is_file():
        raise MissingFileError(missing_message)


def _iter_records(path: Path, allow_empty: bool) -> Iterator[tuple[int, dict]]:
    num_records = 0
    for line_no, raw in _iter_raw_lines(path):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            hint = ""
            if line_no == 1 and raw.startswith(GZIP_MAGIC):
                hint = " (the file holds gzip data: name it *.gz to have it decompressed)"
            raise DataFormatError(path, line_no, None, f"line is not valid UTF-8: {err}{hint}") from None
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except RecursionError:
            message = "invalid JSON: arrays/objects nested too deeply to decode"
            raise DataFormatError(path, line_no, None, message) from None
        except json.JSONDecodeError as err:  # its position is within this line, which is the file's line_no
            raise DataFormatError(path, line_no, None, f"invalid JSON {json_error_position(text, err)}: {err.msg}") from None
        except ValueError as err:  # an integer with too many digits to convert
            raise DataFormatError(path, line_no, None, f"invalid JSON: {err}") from None
        if not isinstance(record, dict):
            raise DataFormatError(
                path, line_no, None, f"expected a JSON object per line, got {type(record).__name__}"
            )
        if _SURROGATE_ESCAPE.search(text):
            field = lone_surrogate_field(record)
            if field is not None:
                raise DataFormatError(
                    path, line_no, field, "string holds a lone UTF-16 surrogate escape (e.g. \"\\ud800\"), which "
                    "is not Unicode text; fix the encoding of this line"
                )
        num_records += 1
        yield line_no, record
    if num_records == 0 and not allow_empty:
        raise DataFormatError(path, None, None, "the file holds no JSON records (it is empty or has only blank lines)")


def json_error_position(line: str, err: json.JSONDecodeError) -> str:
    """Where in ``line`` (one line of a file, as decoded) ``json.loads(line)`` failed: ``"at column N"`` (1-based,
    in characters), ``"at column N (end of line)"`` when the record stops before the decoder expected it to.
    The decoder's own ``line 2 column 1`` counts the line's trailing newline as a second line."""
    content = len(line.rstrip("\r\n"))
    column = min(err.pos, content) + 1
    return f"at column {column}" + (" (end of line)" if err.pos >= content else "")


def _iter_raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line_no, raw bytes)`` of the lines of ``path``, with damaged gzip data reported as a located
    :class:`DataFormatError` (the line being read when the data broke off) instead of an ``EOFError``,
    ``gzip.BadGzipFile`` or ``zlib.error``."""
    line_no = 0
    try:
        with _open_lines(path) as lines:
            for raw in lines:
                line_no += 1
                yield line_no, raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        if not path.name.endswith(".gz"):
            raise
        if line_no == 0 and not _is_gzip(path):
            raise DataFormatError(
                path, None, None, "not a gzip file, though its name ends in .gz (it does not start with the gzip "
                "magic bytes 1f 8b); compress it with gzip, or rename it without .gz if it is plain JSON lines"
            ) from None
        if isinstance(err, EOFError):
            what = "truncated gzip file: the compressed data ends before the gzip end-of-stream marker"
        else:
            what = f"corrupt gzip data ({err})"
        raise DataFormatError(
            path, line_no + 1, None, f"{what}, after {line_no} complete lines; the file was cut short or damaged "
            "(e.g. an interrupted download or copy)"
        ) from None


def lone_surrogate_field(record: Any) -> str | None:
    """The path (``"chosen[1].content"``) of the first string of a decoded JSON value holding a lone UTF-16
    surrogate (a key is named by its object's path and the key), or None when every string is valid Unicode.
    Iterative, so any nesting depth ``json.loads`` accepted is walked."""
    stack: list[tuple[str, Any]] = [("", record)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if not _encodes_as_utf8(value):
                return where or "<value>"
        elif isinstance(value, dict):
            items = []
            for key, item in value.items():
                name = f"{where}.{key}" if where else str(key)
                if not _encodes_as_utf8(key):
                    return f"{where or '<object>'} (a key)"
                items.append((name, item))
            stack.extend(reversed(items))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


def _encodes_as_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
