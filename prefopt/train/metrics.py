"""Metric accumulation across micro-batches, steps and processes, and the metrics.jsonl writer.

Metrics arrive as (sum, count) pairs, so a mean over a logging window is exact whatever
the micro-batch sizes, and a reduction across processes is a single all-reduce of sums
and counts.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch


class MetricAccumulator:
    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, total, count: float) -> None:
        total = float(total.detach()) if isinstance(total, torch.Tensor) else float(total)
        self.sums[name] = self.sums.get(name, 0.0) + total
        self.counts[name] = self.counts.get(name, 0.0) + float(count)

    def add_all(self, pairs: dict) -> None:
        for name, (total, count) in pairs.items():
            self.add(name, total, count)

    def merge(self, other: "MetricAccumulator") -> None:
        for name in other.sums:
            self.add(name, other.sums[name], other.counts[name])

    def means(self, accelerator=None) -> dict[str, float]:
        """Means over everything added since the last reset, summed over all processes."""
        names = sorted(self.sums)
        if accelerator is not None and accelerator.num_processes > 1:
            packed = torch.tensor([self.sums[n] for n in names] + [self.counts[n] for n in names],
                                  dtype=torch.float64, device=accelerator.device)
            packed = accelerator.reduce(packed, reduction="sum").tolist()
            sums, counts = packed[:len(names)], packed[len(names):]
        else:
            sums, counts = [self.sums[n] for n in names], [self.counts[n] for n in names]
        return {n: (s / c if c else math.nan) for n, s, c in zip(names, sums, counts)}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


class MetricsWriter:
    """OUTPUT_DIR/metrics.jsonl: one JSON object per logging or eval event, with ``step``."""

    def __init__(self, path: Path, enabled: bool, keep_until: int = 0, log_fn=None):
        """Start the file afresh, or (resuming at step ``keep_until`` > 0) keep the rows of the
        steps up to it and drop any logged after it by the interrupted run. ``log_fn(values,
        step)`` also receives every row's numbers (accelerate's trackers)."""
        self.path = path
        self.enabled = enabled
        self.log_fn = log_fn
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if keep_until > 0 and path.is_file():
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= keep_until]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, values: dict) -> None:
        if self.log_fn is not None:
            self.log_fn({k: float(v) for k, v in values.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=step)
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in values.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def prefixed(prefix: str, values: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in values.items()}


def read_rows(path: Path) -> list[dict]:
    """metrics.jsonl's rows; none when the file is missing, and a line cut by a killed run is left out."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def last_rows(path: Path) -> tuple[dict, dict]:
    """The last training row (with ``loss``) and the last eval row (``eval/`` keys) of metrics.jsonl."""
    train, evaluation = {}, {}
    for row in read_rows(path):
        if any(k.startswith("eval/") for k in row):
            evaluation = row
        elif "loss" in row:
            train = row
    return train, evaluation
