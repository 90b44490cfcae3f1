"""Streaming reader for JSON-lines data files (plain or gzip-compressed) with located errors."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Iterator


class DataFormatError(ValueError):
    """A record in a data file is malformed.

    ``str(err)`` is ``"{path}:{line_no}: field '{field}': {message}"`` (or
    ``"{path}:{line_no}: {message}"`` when ``field`` is None), so the offending
    line can be opened directly from the message.

    Attributes:
        path: the data file (as given).
        line_no: 1-based line number in that file.
        field: name of the offending field, or None when the whole line is at fault.
        message: what is wrong.
    """

    def __init__(self, path: str | os.PathLike, line_no: int, field: str | None, message: str):
        self.path = path
        self.line_no = line_no
        self.field = field
        self.message = message
        where = f"{path}:{line_no}: "
        super().__init__(where + (message if field is None else f"field '{field}': {message}"))

    def __reduce__(self):
        # Keeps the error picklable (e.g. when raised inside a worker process).
        return (type(self), (self.path, self.line_no, self.field, self.message))


def _open_lines(path: Path):
    """Open ``path`` for binary line iteration, decompressing when the name ends in ``.gz``."""
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Stream the JSON objects of a JSON-lines file, one line at a time.

    Files whose name ends in ``.gz`` (e.g. ``train.jsonl.gz``) are decompressed on the
    fly; anything else (``.jsonl``, ``.json`` with one object per line) is read as is.
    Blank lines are skipped. Only one line is held in memory at a time.

    Args:
        path: the file to read.

    Returns:
        An iterator of ``(line_no, record)`` with ``line_no`` 1-based (blank lines count).

    Raises:
        FileNotFoundError: ``path`` does not exist (raised immediately, not on first ``next``).
        DataFormatError: while iterating, for a line that is not valid UTF-8, not valid
            JSON (the message includes the decoder's error) or not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSON-lines data file not found: {path} (resolved to {path.absolute()})")
    return _iter_records(path)


def _iter_records(path: Path) -> Iterator[tuple[int, dict]]:
    with _open_lines(path) as lines:
        for line_no, raw in enumerate(lines, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(path, line_no, None, f"line is not valid UTF-8: {err}") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataFormatError(path, line_no, None, f"invalid JSON: {err}") from None
            if not isinstance(record, dict):
                raise DataFormatError(
                    path, line_no, None, f"expected a JSON object per line, got {type(record).__name__}"
                )
            yield line_no, record
