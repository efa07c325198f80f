"""What happened to the data: nothing is dropped or truncated without being counted here.

A ``DataReport`` is filled while a dataset is read, converted and tokenised. It applies
the ``data.on_error`` policy: with ``raise`` a bad record stops the run with its file,
line and problem; with ``skip`` it is counted by reason and kept for
``OUTPUT_DIR/rejected_records.jsonl``. An example left out on purpose (a pair whose chosen and
rejected become identical when cut to ``data.max_length``) is *dropped*: counted by reason,
never a stop. ``records`` = ``examples`` + dropped + rejected for paired data (conversions
between kinds of data, e.g. a pair split into two unpaired examples, are counted apart).

``summary()`` is the one line printed per dataset when the data is ready, e.g.::

    train: 300 records (sharegpt) -> 299 examples; truncated: 292 prompts, 153 chosen, 161 rejected;
    dropped 1: 1 chosen == rejected after truncation
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefopt.data.schema import Origin
from prefopt.errors import DataError

log = logging.getLogger("prefopt")

# count key -> how the summary line names it
TRUNCATED = {"prompt_truncated": "prompts", "chosen_truncated": "chosen", "rejected_truncated": "rejected",
             "completion_truncated": "completions", "ref_completion_truncated": "reference completions"}
DROP_REASONS = {"identical_after_truncation": "chosen == rejected after truncation"}


@dataclass
class DataReport:
    name: str                      # "train" or "eval"
    on_error: str = "raise"
    format: str | None = None
    records: int = 0               # records read from the source
    examples: int = 0              # examples that reached the model
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    rejects: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)    # truncations, mismatches, conversions
    dropped: Counter = field(default_factory=Counter)   # reason -> examples left out on purpose
    notes: list[str] = field(default_factory=list)      # warnings worth reading once
    source: str | None = None      # the file (or object) read, for messages about the whole dataset

    def reject(self, origin: Origin, reason: str, problem: str, record: Any = None) -> None:
        """Stop (on_error=raise) or count and keep the record (on_error=skip)."""
        if self.on_error == "raise":
            raise DataError(str(origin), f"{problem} (set data.on_error: skip to skip such records)")
        self.rejected[reason] += 1
        self.rejects.append({"dataset": self.name, "where": str(origin), "reason": reason,
                             "problem": problem, "record": record})

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] += n

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def as_dict(self) -> dict:
        return {"dataset": self.name, "source": self.source, "format": self.format, "records": self.records,
                "examples": self.examples, "rejected": dict(self.rejected), "dropped": dict(self.dropped),
                **{k: v for k, v in sorted(self.counts.items())}, "notes": self.notes}

    def summary(self) -> str:
        """One line: records -> examples, every truncation by part, every drop and reject by reason,
        then the other counts (conversions, boundary mismatches...)."""
        parts = [f"{self.name}: {self.records} records ({self.format or 'format unknown'}) -> "
                 f"{self.examples} examples"]
        cut = [f"{self.counts[key]} {label}" for key, label in TRUNCATED.items() if self.counts[key]]
        parts.append("truncated: " + (", ".join(cut) if cut else "none"))
        if self.dropped:
            parts.append(f"dropped {sum(self.dropped.values())}: " + ", ".join(
                f"{n} {DROP_REASONS.get(r, r)}" for r, n in self.dropped.most_common()))
        if self.rejected:
            parts.append("rejected " + ", ".join(f"{n} {r}" for r, n in self.rejected.most_common()))
        parts += [f"{n} {what}" for what, n in sorted(self.counts.items()) if n and what not in TRUNCATED]
        return "; ".join(parts)

    def write_rejects(self, path: Path) -> None:
        """Append this dataset's rejected records to a JSONL file (one object per record)."""
        if not self.rejects:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # backslashreplace: a lone surrogate in a rejected record is written as the JSON escape
        # "\ud800" it was read from, instead of failing to encode.
        with path.open("a", encoding="utf-8", errors="backslashreplace") as fh:
            for row in self.rejects:
                fh.write(json_line(row) + "\n")


# Line breaks to str.splitlines() (and some editors) that JSON leaves raw inside strings; escaped,
# one rejected record stays one line for every reader. (JSON escapes the other control characters.)
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def json_line(row: Any) -> str:
    """``row`` as one line of JSON Lines: readable text (non-ASCII kept), no character any reader splits at."""
    return json.dumps(row, ensure_ascii=False, default=str).translate(_LINE_BREAKS)


class DataUnusable(DataError):
    """A dataset with no usable example. ``reports`` (every dataset's so far) say why: the caller
    writes them (``write_reports``) before stopping, so the reasons are not lost with the run."""

    def __init__(self, where: str, problem: str, reports: list[DataReport] | None = None):
        super().__init__(where, problem)
        self.reports = list(reports or [])


def merge_reports(whole: DataReport, part: DataReport) -> None:
    """``part``'s counts into ``whole``'s (a chunk's, or a process's share's, in order). A "first at
    ..." note is kept from the earliest part that has one, as one reader would have written it."""
    whole.records += part.records
    whole.examples += part.examples
    whole.rejected.update(part.rejected)
    whole.rejects.extend(part.rejects)
    whole.counts.update(part.counts)
    whole.dropped.update(part.dropped)
    kinds = {_note_kind(n) for n in whole.notes}
    whole.notes.extend(n for n in part.notes if _note_kind(n) not in kinds)


def _note_kind(note: str) -> str:
    return note.split(" (first at ")[0].split("; the first is ")[0]


def write_reports(output_dir: Path, reports: list[DataReport]) -> None:
    """OUTPUT_DIR/data_report.json and rejected_records.jsonl (both replaced), the summaries logged."""
    output_dir.mkdir(parents=True, exist_ok=True)
    rejects = output_dir / "rejected_records.jsonl"
    rejects.unlink(missing_ok=True)
    for report in reports:
        log.info("data %s", report.summary())
        for note in report.notes:
            log.warning("data %s: %s", report.name, note)
        report.write_rejects(rejects)
        if report.rejects:
            log.warning("data %s: %d record(s) skipped, written to %s", report.name, len(report.rejects), rejects)
    (output_dir / "data_report.json").write_text(json.dumps([r.as_dict() for r in reports], indent=2))
