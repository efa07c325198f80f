"""Source formats: each small module here converts one record layout to the canonical schema.

A ``Format`` knows how to recognise a record (``detect``) and how to convert it
(``convert`` returns the canonical fields). Unless ``data.format`` names it, the pipeline
detects the format once, by majority over the first SAMPLE_SIZE readable records (each
record votes for the first registered format that recognises it; a tie goes to the format
seen first), and then converts every record with it: a record of another layout is
reported at its own line instead of being silently read another way, and one odd record
at the top of a file does not decide how the rest is read. ``data.columns`` renames
source columns first, which makes any other layout usable without code.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prefopt.data.schema import RecordProblem
from prefopt.errors import unknown


@dataclass(frozen=True)
class Format:
    name: str
    kind: str                       # "paired" | "unpaired" | "completion" | "prompt" | "listwise"
    detect: Callable[[dict], bool]
    convert: Callable[[dict], dict]  # -> {prompt, chosen, rejected} or {prompt, completion[, label]}
                                     # or {prompt, responses, scores, explicit[, names]} (listwise)
    description: str
    example: str
    empty_ok: tuple[str, ...] = ()   # fields that may be empty text (HH replies, the text format's prompt)


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    assert fmt.kind in ("paired", "unpaired", "completion", "prompt", "listwise") and fmt.name not in FORMATS
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


SAMPLE_SIZE = 100  # records the format is detected from


def recognise(record: dict) -> Format | None:
    """The first registered format that recognises ``record`` (formats are in priority order)."""
    for fmt in FORMATS.values():
        try:
            if fmt.detect(record):
                return fmt
        except Exception:  # a detector that trips on odd values simply does not match
            continue
    return None


@dataclass(frozen=True)
class Detection:
    """The format most sampled records have, and how the sample voted."""
    format: Format
    votes: Counter    # format name -> sampled records it recognises
    sampled: int      # readable records in the sample (some may fit no format)

    def describe(self) -> str:
        return f"{self.votes[self.format.name]} of {self.sampled} records sampled"

    def note(self) -> str | None:
        """A line for the report when the sample was not unanimous."""
        if self.votes[self.format.name] == self.sampled:
            return None
        others = [f"{n} {name}" for name, n in self.votes.most_common() if name != self.format.name]
        unfit = self.sampled - sum(self.votes.values())
        others += [f"{unfit} of no known format"] if unfit else []
        return (f"data format '{self.format.name}' detected from {self.describe()} (also seen: "
                f"{', '.join(others)}); records that do not fit it are rejected at their line")


def detect_majority(records: Iterable[dict]) -> Detection | None:
    """The format of most ``records`` (ties: the one seen first), or None when none fits any."""
    records = list(records)
    votes = Counter(fmt.name for fmt in map(recognise, records) if fmt is not None)
    if not votes:
        return None
    name = max(votes, key=votes.get)  # a Counter keeps first-seen order: ties go to the earliest
    return Detection(FORMATS[name], votes, len(records))


def cannot_detect(record: dict, sampled: int = 1) -> str:
    """Why no format was detected, with every known layout and the two ways out."""
    listing = "; ".join(f"{f.name} ({f.kind}): {f.example}" for f in FORMATS.values())
    rest = f" None of the {sampled} records sampled has a known layout." if sampled > 1 else ""
    return (f"cannot detect the data format from the keys {sorted(map(str, record))}; known "
            f"formats: {listing}. Set data.format, or map your columns with "
            f"data.columns (e.g. {{prompt: question, chosen: good, rejected: bad}}).{rest}")


# Registration order is detection priority: most specific first (segment's `history` before the
# conversational formats, which would read its records as conversations; the listwise formats
# before the pair formats: a list of rejected texts is several rejected).
from prefopt.data.formats import (sharegpt, segment, stack_exchange, hh, plain_implicit, listwise,  # noqa: E402,F401
                                  conversational, plain, unpaired, sft, text, prompts)
