"""Source formats: each small module here converts one record layout to the canonical schema.

A ``Format`` knows how to recognise a record (``detect``) and how to convert it
(``convert`` returns the canonical fields). The pipeline detects the format once from the
first readable record, unless ``data.format`` names it, and then converts every record
with it, so a record that does not fit is reported at its own line instead of being
silently read another way. ``data.columns`` renames source columns first, which makes
any other layout usable without code.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefopt.data.schema import RecordProblem
from prefopt.errors import DataError, unknown


@dataclass(frozen=True)
class Format:
    name: str
    kind: str                       # "paired" | "unpaired" | "completion" | "prompt"
    detect: Callable[[dict], bool]
    convert: Callable[[dict], dict]  # -> {prompt, chosen, rejected} or {prompt, completion[, label]}
    description: str
    example: str


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    assert fmt.kind in ("paired", "unpaired", "completion", "prompt") and fmt.name not in FORMATS
    FORMATS[fmt.name] = fmt
    return fmt


def require(record: dict, key: str) -> Any:
    """record[key], or a RecordProblem that lists the keys the record does have."""
    if key not in record:
        raise RecordProblem("missing_field", f"missing field '{key}' (record has: "
                                             f"{', '.join(map(str, record)) or 'nothing'})")
    if record[key] is None:  # Parquet / datasets fill absent keys with null
        raise RecordProblem("missing_field", f"field '{key}' is null")
    return record[key]


def require_str(record: dict, key: str) -> str:
    value = require(record, key)
    if not isinstance(value, str):
        raise RecordProblem("wrong_type", f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise KeyError(unknown("data format", name, list(FORMATS) + ["auto"]))
    return FORMATS[name]


def detect_format(record: dict, where: str, kinds: tuple[str, ...]) -> Format:
    """The first registered format that recognises ``record`` (formats are in priority order)."""
    for fmt in FORMATS.values():
        try:
            if fmt.detect(record):
                return fmt
        except Exception:  # a detector that trips on odd values simply does not match
            continue
    listing = "; ".join(f"{f.name} ({f.kind}): {f.example}" for f in FORMATS.values())
    raise DataError(where, f"cannot detect the data format from the keys {sorted(record)}; known "
                           f"formats: {listing}. Set data.format, or map your columns with "
                           f"data.columns (e.g. {{prompt: question, chosen: good, rejected: bad}}).")


# Registration order is detection priority: most specific first.
from prefopt.data.formats import (sharegpt, stack_exchange, hh, conversational, plain, unpaired, sft,  # noqa: E402,F401
                                  prompts)
