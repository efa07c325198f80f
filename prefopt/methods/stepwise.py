"""sDPO: stepwise DPO (Kim et al. 2024, "sDPO: Don't Use Your Data All at Once").

The preference data is used in ordered chunks (easier first, in the paper): step k trains
on chunk k with step k−1's model as the reference (step 1: the initial model), so the
reference becomes stronger step by step (the paper's §2.2, "using the aligned model of the
previous step as the reference").

Chunks: ``stepwise.sources`` (one data source per step, in order), or ``data.train`` cut into
``stepwise.chunks`` contiguous parts in data order (the user orders it).
"""
from __future__ import annotations

import logging
from pathlib import Path

from prefopt.config import RunConfig
from prefopt.errors import ConfigError
from prefopt.methods.rounds import Rounds
from prefopt.generate import is_main_process

log = logging.getLogger("prefopt")


def chunk_sources(config: RunConfig) -> list:
    """One list of records (or a source) per step."""
    sw = config.stepwise
    if sw.sources:
        return list(sw.sources)
    if config.data.train is None:
        raise ConfigError("set stepwise.sources (one data source per step) or data.train")
    if sw.chunks < 1:
        raise ConfigError(f"stepwise.chunks must be >= 1 (got {sw.chunks})")
    from prefopt.data.sources import read_records

    from prefopt.data.report import DataReport

    report = DataReport("train", config.data.on_error)
    rows = []
    for r in read_records(config.data.train, config.data.split):  # unreadable lines: raise, or count and keep
        if r.data is None:
            report.reject(r.origin, "malformed", r.problem, r.raw)
        else:
            rows.append(r.data)
    rejects = Path(config.output_dir) / "rejected_records.jsonl"
    if is_main_process():
        rejects.unlink(missing_ok=True)
        report.write_rejects(rejects)
    if len(rows) < sw.chunks:
        raise ConfigError(f"{len(rows)} records cannot make {sw.chunks} chunks")
    size, extra = divmod(len(rows), sw.chunks)
    chunks, start = [], 0
    for k in range(sw.chunks):
        end = start + size + (k < extra)
        chunks.append(rows[start:end])
        start = end
    return chunks


def run_stepwise(config: RunConfig) -> dict:
    chunks = chunk_sources(config)
    rounds = Rounds(config, "stepwise")
    for k, chunk in enumerate(chunks, start=1):
        info = {"chunk": chunk if isinstance(chunk, str) else f"records of data.train: {len(chunk)}"}
        rounds.train(k, chunk, info=info)
    return {"final_model": rounds.model_path, "rounds": rounds.history}
