"""data.streaming: training data larger than memory, read, converted and encoded as training
consumes it.

    source ──read (lazily, with line numbers)──▶ this process's records (index % P == p)
           ──format / convert / encode / roles──▶ shuffle buffer ──▶ micro-batches, pass after pass

* Each process reads the file and keeps every P-th record (its share), so no process tokenises
  the whole set and no example is held beyond the shuffle buffer (``data.shuffle_buffer``
  examples) and the micro-batch being filled.
* The order of pass e is a function of (seed, e, process) only: the buffer draws with a
  generator seeded by ``seed + e`` (Hugging Face datasets' ``IterableDataset.shuffle`` works the
  same way). A resumed run re-reads the pass it stopped in and skips the micro-batches already
  trained on, so it sees exactly the batches the uninterrupted run saw.
* The micro-batches run on across passes: an optimizer step always has
  ``gradient_accumulation_steps`` of them, so every process takes part in every step even
  when the shares differ by a record. The length of the data is not known in advance, so a
  streamed run needs ``train.max_steps``.
* Every record is counted in the data report as in memory (rejects with file:line, drops,
  truncations): during the first pass this run reads, summed over processes at the end.
* KTO's mismatched pair (prefopt.data.roles) is the next example of the process's share in
  file order (the last one's: the first's), as in memory it is the next example of the file.
"""
from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from os import PathLike
from typing import Any

from prefopt.config import DataConfig
from prefopt.data.pipeline import as_kind, encode_all, iter_examples
from prefopt.data.report import DataReport, merge_reports
from prefopt.data.roles import expand_roles
from prefopt.data.tokenize import EncodedExample, Encoder
from prefopt.errors import ConfigError

log = logging.getLogger("prefopt")


@dataclass
class StreamedData:
    """The train data of a streamed run: iterable pass by pass; ``report`` fills as it is read."""
    source: Any
    cfg: DataConfig
    encoder: Encoder
    kind: str
    columns: tuple
    roles: tuple[str, ...]
    seed: int
    process_index: int = 0
    num_processes: int = 1
    report: DataReport | None = None
    counting_pass: int | None = None   # the pass whose records the report counts (the first one read)
    encoded: int = 0                    # examples encoded so far (all passes): what laziness is measured by
    counted_whole_pass: bool = False    # the counting pass was read to its end

    def __post_init__(self):
        self.report = DataReport("train", self.cfg.on_error)

    def examples(self, epoch: int) -> Iterator[EncodedExample]:
        """Pass ``epoch`` over this process's share, shuffled through the buffer."""
        counting = self.counting_pass is None  # the first pass this run reads is the one reported
        if counting:
            self.counting_pass = epoch
        report = self.report if counting else DataReport("train", self.cfg.on_error)
        ordered = self._encoded(report)
        size = max(1, self.cfg.shuffle_buffer)
        rng = random.Random(self.seed + epoch)
        buffer: list[EncodedExample] = []
        for example in ordered:
            if len(buffer) < size:
                buffer.append(example)
                continue
            i = rng.randrange(size)
            buffer[i], example = example, buffer[i]
            yield example
        rng.shuffle(buffer)
        yield from buffer
        if counting:
            self.counted_whole_pass = True

    def head(self, n: int) -> list[EncodedExample]:
        """The first ``n`` examples of the share in file order (the setup checks run on them),
        counted nowhere."""
        return list(itertools.islice(self._encoded(DataReport("train", "skip"), counted=False), n))

    def gathered_report(self, accelerator) -> DataReport:
        """The counting pass's report summed over the processes (each read its share), saying so
        when the run ended before that pass did (the usual case for data larger than memory)."""
        whole, parts = self.report, [(self.report, self.counted_whole_pass)]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object(parts)
            whole = DataReport("train", self.cfg.on_error, self.report.format, source=self.report.source)
            for part, _ in parts:
                merge_reports(whole, part)
        if not all(whole_pass for _, whole_pass in parts):
            whole.notes.append(f"streamed: the run ended before its first pass over the data did; the counts "
                               f"cover the {whole.records} records read (shuffle buffer included)")
        return whole

    def _encoded(self, report: DataReport, counted: bool = True) -> Iterator[EncodedExample]:
        """This process's examples in file order, encoded, with their roles."""
        records = iter_examples(self.source, self.cfg, report, *self.columns,
                                keep=lambda index: index % self.num_processes == self.process_index)
        first = previous = None
        for example in records:
            for encoded in encode_all(as_kind([example], self.kind, report), self.encoder, report, show=False):
                self.encoded += counted
                report.examples += 1
                if self.kind == "unpaired":
                    report.count("desirable" if encoded.label else "undesirable")
                if "kl" not in self.roles:
                    yield expand_roles([encoded], self.roles)[0]
                    continue
                if previous is not None:  # KTO: the previous example's mismatched pair is this one
                    yield expand_roles([previous, encoded], self.roles)[0]
                else:
                    first = encoded
                previous = encoded
        if previous is not None and "kl" in self.roles:
            yield expand_roles([previous, first], self.roles)[0]


class StreamLoader:
    """Micro-batches of a ``StreamedData``, endlessly, on the accelerator's device.
    ``from_position(epoch, batch)`` yields ``(batch, last_of_pass)`` from micro-batch ``batch``
    of pass ``epoch`` on (the ones before it are read and skipped, not collated)."""

    def __init__(self, data: StreamedData, collator: Callable, batch_size: int, device):
        self.data, self.collator, self.batch_size, self.device = data, collator, batch_size, device

    def from_position(self, epoch: int, skip: int) -> Iterator[tuple[Any, bool]]:
        for e in itertools.count(epoch):
            chunks = _chunks(self.data.examples(e), self.batch_size)
            current = next(chunks, None)
            if current is None:
                raise ConfigError(f"process {self.data.process_index} has no training example in pass {e} of "
                                  f"{self.data.report.source}: the data has fewer usable records than processes")
            first = skip if e == epoch else 0   # micro-batches of the resumed pass already trained on
            index = 0
            for upcoming in itertools.chain(chunks, [None]):
                if index >= first:
                    yield self.collator(current).to(self.device), upcoming is None
                index, current = index + 1, upcoming
                if current is None:
                    break
            if index <= first and first:
                raise ConfigError(f"the checkpoint's data position (micro-batch {first} of pass {e}) is past the "
                                  f"end of that pass ({index} micro-batches): the data changed since")


def _chunks(examples: Iterator, size: int) -> Iterator[list]:
    while chunk := list(itertools.islice(examples, size)):
        yield chunk


STREAMING_REFUSES = {
    "data.eval_split_size": "a held-out share needs the whole data; give the evaluation data as data.eval",
    "data.max_tokens_per_batch": "token-budget batches need every example's length in advance",
    "data.group_by_length": "length-sorted windows need every example's length in advance",
    "data.num_proc": "examples are encoded as training reads them, by each process for its share",
    "reference.strategy=precomputed": "the pre-pass reads the whole data before training; use the frozen "
                                      "reference model (or LoRA's base), computed with every batch",
}


def stream_train_data(cfg, source, accelerator, tokenizer, kind: str, columns: tuple,
                      roles: tuple[str, ...]) -> StreamedData:
    """The run's streamed train data (checked against what streaming cannot do), with every
    process agreed that each has a share to train on."""
    import torch

    check_streaming(cfg)
    if source is None:
        raise ConfigError("data.streaming: no training data; pass train_dataset or set data.train")
    named = source if isinstance(source, (str, PathLike)) else type(source).__name__
    if not str(source).endswith((".jsonl", ".jsonl.gz", ".parquet")):
        log.warning("data.streaming: %s is not JSON Lines or Parquet, so it is read whole before its records "
                    "stream (convert it to .jsonl for data larger than memory)", named)
    log.info("data train: streamed from %s (%d process(es), each its share; shuffle buffer %d examples)",
             named, accelerator.num_processes, cfg.data.shuffle_buffer)
    data_cfg = cfg.data
    encoder = Encoder(tokenizer, data_cfg.max_length, data_cfg.max_prompt_length, data_cfg.prompt_truncation,
                      data_cfg.truncation)
    data = StreamedData(source, data_cfg, encoder, kind, columns, roles, cfg.train.seed,
                        accelerator.process_index, accelerator.num_processes)
    # every process must have a share to train on; agreed, so that all of them stop together
    with_data = torch.tensor(float(bool(data.head(1))), device=accelerator.device)
    if accelerator.num_processes > 1:
        with_data = accelerator.reduce(with_data, reduction="sum")
    if with_data.item() < accelerator.num_processes:
        raise ConfigError(f"data.streaming: a process has no usable training record in {data.report.source or named} "
                          f"(its share is every {accelerator.num_processes}th record): the data has fewer usable "
                          f"records than processes")
    return data


PROBE_POOL = 64  # streamed data: the setup checks look among its first examples


def first_examples(data, n: int | None) -> list:
    """The first ``n`` examples (all: None) of a dataset in memory, or of a streamed one's share."""
    if isinstance(data, StreamedData):
        return data.head(n or PROBE_POOL)
    return data.examples[:n]


def check_streaming(cfg) -> None:
    """What a streamed run cannot do, each with its reason (a clear error, never a silent change)."""
    data, train = cfg.data, cfg.train
    if train.max_steps <= 0:
        raise ConfigError("data.streaming: the length of streamed data is not known in advance; set "
                          "train.max_steps (optimizer steps; the data is read again, pass after pass, as needed)")
    used = {"data.eval_split_size": bool(data.eval_split_size), "data.max_tokens_per_batch": bool(data.max_tokens_per_batch),
            "data.group_by_length": data.group_by_length, "data.num_proc": data.num_proc > 1,
            "reference.strategy=precomputed": cfg.reference.strategy == "precomputed"}
    for key, on in used.items():
        if on:
            raise ConfigError(f"data.streaming with {key}: {STREAMING_REFUSES[key]}")
    for strategy in ("eval_strategy", "save_strategy"):
        if getattr(train, strategy) == "epoch":
            raise ConfigError(f"data.streaming with train.{strategy}=epoch: each process's pass ends at its own "
                              f"step (the shares differ); use 'steps'")
