"""Finding input files and reading documents from .txt / .jsonl (optionally .gz / .zst).

Shared by the on-the-fly text task and `gptj.prepare_data`; imports no
TensorFlow, so prepare_data's tokenizer workers start fast.

Documents: a `.txt` file is one document (as in the reference's data tool);
each line of a `.jsonl` file is a JSON object whose text field is one
document (blank lines are ignored).
`read_json_rows` reads several string fields of each row (the SFT task's
prompt and completion).

Bad input: a missing file, a pattern matching nothing, an unreadable
compressed file, a JSON-lines row that is not JSON or lacks the text field,
are errors (`DataError`) naming the file and the row. Empty documents are not
errors; callers skip and count them.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
from typing import Iterator, Sequence

from gptj.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
COMPRESSION_SUFFIXES = (".gz", ".zst")


# Prefix of error messages raised inside a tf.data pipeline (in-graph assertions,
# document generators), so the input iterator can turn TensorFlow's multi-line
# error back into the one line that explains it.
ERROR_TAG = "gptj-data-error: "


def _split_compression(path: str) -> tuple[str, str]:
    """(path without the compression suffix, the suffix or '')."""
    for suffix in COMPRESSION_SUFFIXES:
        if path.endswith(suffix):
            return path[: -len(suffix)], suffix
    return path, ""


def text_format(path: str) -> str:
    """'txt' or 'jsonl' from the file name (a .gz/.zst suffix is looked through)."""
    base, _ = _split_compression(path)
    if base.endswith(".txt"):
        return "txt"
    if base.endswith((".jsonl", ".json")):
        return "jsonl"
    raise DataError(f"{path}: unknown input format; expected .txt or .jsonl, optionally .gz or .zst")


def expand_patterns(patterns: str | Sequence[str], what: str = "input") -> list[str]:
    """Files named by a comma-separated string or list of paths/globs, sorted within each pattern.

    A plain path that does not exist, or a glob that matches nothing, is a
    `DataError` naming it; duplicates are dropped, first occurrence kept.
    """
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    if not patterns:
        raise DataError(f"no {what} files given")
    files: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern.strip())
        if glob.has_magic(pattern):
            matched = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matched:
                raise DataError(f"{what} pattern {pattern!r} matches no files")
        elif os.path.isfile(pattern):
            matched = [pattern]
        else:
            raise DataError(f"{what} file {pattern} does not exist")
        files.extend(matched)
    return list(dict.fromkeys(files))


def open_text(path: str) -> io.TextIOBase:
    """A UTF-8 text stream over a plain, .gz or .zst file."""
    _, compression = _split_compression(path)
    if compression == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if compression == ".zst":
        import zstandard

        raw = open(path, "rb")
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), encoding="utf-8")
    return open(path, "r", encoding="utf-8")


@contextlib.contextmanager
def _reading(path: str):
    """Turns the errors of opening and decoding `path` into one-line `DataError`s naming it."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"input file {path} does not exist") from None
    except (UnicodeDecodeError, EOFError, OSError) as e:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({type(e).__name__}: {e})") from None
    except Exception as e:  # zstandard raises its own ZstdError
        if type(e).__name__ == "ZstdError":
            raise DataError(f"{path}: corrupt .zst stream ({e})") from None
        raise


def read_documents(path: str, text_field: str = "text") -> Iterator[tuple[int, str]]:
    """Yields (row, document text) for one input file; row counts from 1 (the line of a .jsonl).

    Raises `DataError` naming the file (and row) on unreadable or malformed input.
    """
    if text_format(path) == "txt":
        with _reading(path), open_text(path) as f:
            yield 1, f.read()
        return
    for row, (text,) in read_json_rows(path, (text_field,)):
        yield row, text


def read_json_rows(path: str, fields: Sequence[str]) -> Iterator[tuple[int, tuple[str, ...]]]:
    """Yields (row, the string value of each of `fields`) for each non-blank line of a JSON-lines
    file (plain, .gz or .zst); row is the line number, counted from 1. Other keys are ignored.

    A line that is not a JSON object, lacks one of the fields, or holds a non-string
    value there is a `DataError` naming the file and row.
    """
    with _reading(path), open_text(path) as f:
        for row, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {row}: not valid JSON ({e.msg})") from None
            values = []
            for field in fields:
                if not isinstance(obj, dict) or field not in obj:
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise DataError(f"{path}: row {row}: no {field!r} field (found {keys})")
                value = obj[field]
                if not isinstance(value, str):
                    raise DataError(f"{path}: row {row}: field {field!r} is {type(value).__name__}, not a string")
                values.append(value)
            yield row, tuple(values)


def read_index(index_path: str) -> list[str]:
    """The files listed in an index file (one path per line; relative paths are taken from the
    index's folder). Every listed file must exist: a missing one is an error naming index and line."""
    base = os.path.dirname(os.path.abspath(index_path))
    try:
        with open(index_path, "r", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"index file {index_path} does not exist") from None
    files = []
    for lineno, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = line if os.path.isabs(line) or "://" in line else os.path.join(base, line)
        if "://" not in path and not os.path.isfile(path):
            raise DataError(f"{index_path}: line {lineno}: listed file {line} does not exist")
        files.append(path)
    if not files:
        raise DataError(f"index file {index_path} lists no files")
    return files
