"""What happened to the data: nothing is dropped or truncated without being counted here.

A ``DataReport`` is filled while a dataset is read, converted and tokenised. It applies
the ``data.on_error`` policy: with ``raise`` a bad record stops the run with its file,
line and problem; with ``skip`` it is counted by reason and kept for
``OUTPUT_DIR/rejected_records.jsonl``.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefopt.data.schema import Origin
from prefopt.errors import DataError


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
    notes: list[str] = field(default_factory=list)      # warnings worth reading once

    def reject(self, origin: Origin, reason: str, problem: str, record: Any = None) -> None:
        """Stop (on_error=raise) or count and keep the record (on_error=skip)."""
        if self.on_error == "raise":
            raise DataError(str(origin), f"{problem} (set data.on_error: skip to skip such records)")
        self.rejected[reason] += 1
        self.rejects.append({"dataset": self.name, "where": str(origin), "reason": reason,
                             "problem": problem, "record": record})

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] += n

    def as_dict(self) -> dict:
        return {"dataset": self.name, "format": self.format, "records": self.records,
                "examples": self.examples, "rejected": dict(self.rejected),
                **{k: v for k, v in sorted(self.counts.items())}, "notes": self.notes}

    def summary(self) -> str:
        parts = [f"{self.name}: {self.records} records ({self.format}) -> {self.examples} examples"]
        if self.rejected:
            parts.append("rejected " + ", ".join(f"{n} {r}" for r, n in self.rejected.most_common()))
        parts += [f"{n} {what}" for what, n in sorted(self.counts.items()) if n]
        return "; ".join(parts)

    def write_rejects(self, path: Path) -> None:
        """Append this dataset's rejected records to a JSONL file (one object per record)."""
        if not self.rejects:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # backslashreplace: a lone surrogate in a rejected record is written as the JSON escape
        # "\\ud800" it was read from, instead of failing to encode.
        with path.open("a", encoding="utf-8", errors="backslashreplace") as fh:
            for row in self.rejects:
                fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
