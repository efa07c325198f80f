"""Read raw records from wherever the user keeps them, remembering where each came from.

Sources: JSON arrays, JSON Lines (optionally gzipped), Parquet, CSV, folders written by
``datasets.save_to_disk``, hub dataset ids (where a hub is reachable), an in-memory
``datasets.Dataset`` or a list of dicts. Text formats are read here rather than through
``datasets.load_dataset`` so that a malformed record is reported with its file and
line, and one bad line does not hide the rest of the file.
"""
from __future__ import annotations

import bisect
import codecs
import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefopt.data.schema import Origin
from prefopt.errors import DataError

TEXT_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".csv", ".parquet")
# No data format nests deeper than a few levels (record -> messages -> message). A record nested
# deeper is refused when read: later steps (repr in messages, json.dumps into the rejects file,
# comparing conversations) recurse and would hit Python's recursion limit far from its line.
MAX_DEPTH = 100
TOO_DEEP = f"the record is nested more than {MAX_DEPTH} levels deep (no data format nests that deep)"


@dataclass
class RawRecord:
    """One record as read. ``problem`` is set (and ``data`` is None) when it could not be parsed."""
    data: dict | None
    origin: Origin
    problem: str | None = None
    raw: str | None = None  # the unparsable text, for the rejects file


def read_records(source: Any, split: str = "train") -> Iterator[RawRecord]:
    """Yield every record of ``source`` with its origin."""
    if isinstance(source, list):
        yield from _from_rows(source, "<list>")
        return
    if _is_hf_dataset(source):
        yield from _from_rows(source, f"<{type(source).__name__}>")
        return
    if hasattr(source, "keys") and _is_hf_dataset_dict(source):
        yield from _from_rows(_pick_split(source, split, "<DatasetDict>"), f"<DatasetDict[{split}]>")
        return
    path = Path(str(source))
    if path.is_dir():
        yield from _from_disk(path, split)
    elif path.is_file():
        yield from _from_file(path)
    elif any(str(source).endswith(s) for s in TEXT_SUFFIXES) or str(source).startswith((".", "/")):
        raise DataError(str(source), "no such file")
    else:
        yield from _from_hub(str(source), split)


def _is_hf_dataset(obj: Any) -> bool:
    return type(obj).__name__ in ("Dataset", "IterableDataset") and hasattr(obj, "features")


def _is_hf_dataset_dict(obj: Any) -> bool:
    return type(obj).__name__ in ("DatasetDict", "IterableDatasetDict")


def _pick_split(dsd: Any, split: str, where: str):
    if split not in dsd:
        raise DataError(where, f"no split '{split}'; available: {', '.join(dsd.keys())} "
                               f"(set data.split)")
    return dsd[split]


def _from_rows(rows: Any, name: str) -> Iterator[RawRecord]:
    for i, row in enumerate(rows):
        origin = Origin(name, i)
        if not isinstance(row, dict):
            yield RawRecord(None, origin, f"expected a mapping (dict), got {type(row).__name__}")
        elif _too_deep(row):
            yield RawRecord(None, origin, TOO_DEEP)
        else:
            yield RawRecord(dict(row), origin)


def _parsed(obj: Any, origin: Origin, raw: str) -> RawRecord:
    """The record for a parsed JSON value: an object, or the problem with it."""
    if not isinstance(obj, dict):
        return RawRecord(None, origin, f"expected a JSON object, got {type(obj).__name__}", raw=raw)
    if _too_deep(obj):
        return RawRecord(None, origin, TOO_DEEP, raw=raw)
    return RawRecord(obj, origin)


def _too_deep(obj: Any) -> bool:
    """Whether ``obj`` nests lists/dicts more than MAX_DEPTH deep (iterative: deep input is the point)."""
    containers = (dict, list, tuple)
    stack = [(obj, 1)] if isinstance(obj, containers) else []
    while stack:  # only containers are pushed: a long list of numbers costs one pass
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, containers))
    return False


def _from_file(path: Path) -> Iterator[RawRecord]:
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from _from_rows(_parquet_rows(path), str(path))
        return
    opener = gzip.open if name.endswith(".gz") else open
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from _from_json_lines(_lines_of(path, opener), str(path))
        return
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as e:  # EOFError: a truncated .gz
        raise DataError(str(path), f"cannot read file: {e}") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(str(path), "the file is UTF-16 (it starts with a UTF-16 byte-order mark); "
                                   "save it as UTF-8")
    data = data.removeprefix(codecs.BOM_UTF8)  # a BOM: Excel CSV, Windows editors
    # Universal newlines, as text mode reads them: CRLF and old-Mac CR count as one line end.
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    is_json = name.endswith((".json", ".json.gz"))
    if name.endswith(".csv"):
        yield from _from_csv(_decode(data, str(path)), str(path))
    elif is_json and data.lstrip().startswith(b"["):
        yield from _from_json_array(_decode(data, str(path)), str(path))
    elif is_json and (single := _single_object(data, str(path))) is not None:
        yield single
    elif is_json:  # JSON Lines in a .json file
        yield from _from_json_lines(data.split(b"\n"), str(path))
    else:
        raise DataError(str(path), f"unsupported file type; expected one of {', '.join(TEXT_SUFFIXES)} "
                                   f"or a datasets.save_to_disk folder")


def _lines_of(path: Path, opener) -> Iterator[bytes]:
    """A JSON Lines file's lines as they are read (data larger than memory streams): a UTF-8 BOM
    dropped, CRLF and a lone CR ending a line as text mode reads them. Split on b"\n" and b"\r"
    only, not splitlines(): JSON text may hold a raw U+2028 etc. inside a string."""
    try:
        with opener(path, "rb") as fh:
            first = True
            for line in fh:
                if first:
                    if line.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                        raise DataError(str(path), "the file is UTF-16 (it starts with a UTF-16 byte-order "
                                                   "mark); save it as UTF-8")
                    line, first = line.removeprefix(codecs.BOM_UTF8), False
                yield from line.removesuffix(b"\n").removesuffix(b"\r").split(b"\r")
    except (OSError, EOFError) as e:  # EOFError: a truncated .gz
        raise DataError(str(path), f"cannot read file: {e}") from None


def _parquet_rows(path: Path) -> Iterator[dict]:
    """A Parquet file's rows, one row group's batch at a time (data larger than memory streams)."""
    import pyarrow.parquet as pq
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(str(path), f"cannot read Parquet: {e}") from None


def _from_json_lines(lines: Iterator[bytes], path: str) -> Iterator[RawRecord]:
    """One record per line: an undecodable line is one bad record, not a bad file."""
    index = 0
    for lineno, raw_line in enumerate(lines, start=1):
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield RawRecord(None, Origin(path, index, lineno), _invalid_utf8(e, raw_line, 0),
                            raw=raw_line.decode("utf-8", "backslashreplace"))
            index += 1
            continue
        if not line.strip():
            continue
        origin = Origin(path, index, lineno)
        index += 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield RawRecord(None, origin, f"malformed JSON: {e.msg} (column {e.colno})", raw=line)
            continue
        except RecursionError:  # the parser recurses once per level: ~1000 levels overflow it
            yield RawRecord(None, origin, TOO_DEEP, raw=line)
            continue
        yield _parsed(obj, origin, line)


def _decode(data: bytes, path: str) -> str:
    """The whole file as text; an invalid byte is an error at its line (the file is one document)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        lineno = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{lineno}",
                        f"{_invalid_utf8(e, data, line_start)}; the file must be UTF-8") from None


def _invalid_utf8(e: UnicodeDecodeError, data: bytes, line_start: int) -> str:
    return (f"invalid UTF-8: byte 0x{data[e.start]:02x} at byte {e.start - line_start + 1} of the line "
            f"({e.reason})")


def _from_json_array(text: str, path: str) -> Iterator[RawRecord]:
    """A JSON array of objects; each record's origin is the line its object starts on."""
    newlines = [i for i, c in enumerate(text) if c == "\n"]

    def line_of(pos: int) -> int:
        return bisect.bisect_left(newlines, pos) + 1

    decoder = json.JSONDecoder()
    pos = _skip_ws(text, text.index("[") + 1)
    index = 0
    while pos < len(text) and text[pos] != "]":
        # Inside an array there is no way to resynchronise after an error: the file is unusable.
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            if _skip_ws(text, e.pos) >= len(text):  # cut off: name the record, not the end of the file
                raise DataError(f"{path}:{line_of(pos)}", "malformed JSON: the file ends inside this record "
                                                          "(is it truncated?); records before it were read fine") from None
            raise DataError(f"{path}:{e.lineno}", f"malformed JSON: {e.msg} (column {e.colno}); "
                                                  f"records before it were read fine") from None
        except RecursionError:
            raise DataError(f"{path}:{line_of(pos)}", f"{TOO_DEEP}; records before it were read fine") from None
        origin = Origin(path, index, line_of(pos))
        index += 1
        yield _parsed(obj, origin, text[pos:end][:2000])
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
        elif pos >= len(text) or text[pos] != "]":
            raise DataError(f"{path}:{line_of(pos)}", "malformed JSON: expected ',' or ']' after a record")
    if pos >= len(text):  # e.g. a truncated file ending just after a ','
        raise DataError(f"{path}:{line_of(pos)}", "malformed JSON: the array is not closed with ']' "
                                                  "(is the file truncated?)")


def _single_object(data: bytes, path: str) -> RawRecord | None:
    """The record of a .json file holding one (possibly pretty-printed) object, else None (JSON
    Lines). An invalid byte in such an object is an error at its line, as in an array."""
    if not data.lstrip().startswith(b"{") or data.strip().count(b"\n") == 0:
        return None
    text = data.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError):  # then read as lines, each with its own error
        return None
    if not isinstance(obj, dict):
        return None
    _decode(data, path)  # raises at the line of an invalid byte
    return _parsed(obj, Origin(path, 0, 1 + data[:len(data) - len(data.lstrip())].count(b"\n")), text[:2000])


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _from_csv(text: str, path: str) -> Iterator[RawRecord]:
    rows = _csv_rows(text, path)
    header = rows[0][1] if rows else []
    index = 0
    for start_line, row in rows[1:]:
        if row:  # a blank line reads as []
            origin = Origin(path, index, start_line)
            index += 1
            if len(row) > len(header):
                yield RawRecord(None, origin, f"row has more fields than the header ({len(header)})")
            else:  # missing trailing fields are None, as with DictReader
                yield RawRecord(dict(zip(header, row + [None] * (len(header) - len(row)))), origin)


def _csv_rows(text: str, path: str) -> list[tuple[int, list[str]]]:
    """Every row with the line it starts on (a quoted field may span several lines). csv.reader
    rather than DictReader: DictReader skips blank lines silently, which would make the line of
    the row after a blank line wrong. Fields may be of any length (csv's default limit is 128 KB,
    a long prompt is a too_long record later, not a file error); the limit is process-wide, so it
    is raised only while this file is parsed."""
    limit = csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, start_line = [], 1
    try:
        for row in reader:
            rows.append((start_line, row))
            start_line = reader.line_num + 1
    except csv.Error as e:  # e.g. a NUL byte on Pythons before 3.11, or a stray quote in strict mode
        raise DataError(f"{path}:{start_line}", f"malformed CSV: {e}") from None
    finally:
        csv.field_size_limit(limit)
    return rows


def _from_disk(path: Path, split: str) -> Iterator[RawRecord]:
    """A save_to_disk folder, or else a folder of data files read like a hub dataset repo."""
    import datasets
    if not any((path / marker).is_file() for marker in ("dataset_dict.json", "state.json")):
        yield from _from_hub(str(path), split)
        return
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError or its own errors
        raise DataError(str(path), f"not a datasets.save_to_disk folder: {e}") from None
    if _is_hf_dataset_dict(ds):
        ds = _pick_split(ds, split, str(path))
    yield from _from_rows(ds, str(path))


def _from_hub(name: str, split: str) -> Iterator[RawRecord]:
    import datasets
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown repo, missing split: all surface here
        what = "a folder of data files" if Path(name).is_dir() else "no such file, and"
        raise DataError(name, f"{what} loading it as a hub dataset failed: "
                              f"{type(e).__name__}: {str(e)[:300]}") from None
    yield from _from_rows(ds, f"{name}[{split}]")
