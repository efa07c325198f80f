"""Batch orders for training and evaluation.

Training: a seeded permutation per epoch (``EpochSampler``), cut into micro-batches of a
number of examples or of a token budget (``MicroBatchSampler``). With ``group_by_length`` the
permutation is cut into windows of about 50 micro-batches, each sorted longest first, so a
micro-batch holds examples of similar lengths (less padding, fuller packed rows) while the
windows keep the order random. Under several processes accelerate shards the micro-batches
and fills a short last round by repeating the first examples (its ``even_batches``), so every
process takes full batches.

Evaluation must count every example exactly once, on any number of processes, while every
process still runs the same number of forward passes (a sharded model's forward is a
collective). ``EvalBatchSampler`` deals batches round-robin and gives a process that has
run out a *padding* batch, which is scored but not counted.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

GROUP_WINDOW = 50  # micro-batches per length-sorted window


class EpochSampler(Sampler):
    """A seeded permutation per epoch: the order of epoch e is a function of (seed, e) only,
    so a resumed run sees exactly the batches the uninterrupted run would have seen.
    ``lengths`` and ``window``: sort each consecutive window of the permutation longest first."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, lengths: list[int] | None = None,
                 window: int = 0):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0
        self.lengths, self.window = lengths, window

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.size))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=gen).tolist()
        if self.lengths is not None and self.window:
            order = [i for s in range(0, len(order), self.window)
                     for i in sorted(order[s:s + self.window], key=lambda i: -self.lengths[i])]
        return iter(order)

    def __len__(self) -> int:
        return self.size


class MicroBatchSampler(BatchSampler):
    """Micro-batches of ``batch_size`` examples, or, with ``max_tokens``, of whole examples whose
    tokens stay within that budget (an example larger than the budget is a micro-batch alone)."""

    def __init__(self, sampler: EpochSampler, batch_size: int, lengths: list[int] | None = None,
                 max_tokens: int | None = None):
        super().__init__(sampler, batch_size, drop_last=False)
        self.lengths, self.max_tokens = lengths, max_tokens
        if max_tokens:
            # accelerate's process sharding regroups batches of a fixed size when it sees one;
            # token-budget batches have none, and are dealt whole to processes round-robin
            self.batch_size = None

    def __iter__(self):
        batch, tokens = [], 0
        budget = self.max_tokens or self.batch_size
        for i in self.sampler:
            cost = self.lengths[i] if self.max_tokens else 1
            if batch and tokens + cost > budget:
                yield batch
                batch, tokens = [], 0
            batch.append(i)
            tokens += cost
        if batch:
            yield batch

    def __len__(self) -> int:
        if not self.max_tokens:
            return math.ceil(len(self.sampler) / self.batch_size)
        return sum(1 for _ in iter(self))  # this epoch's count (token budgets vary with the order)


class EvalBatchSampler(Sampler):
    """This process's share of the evaluation batches, in order, padded to equal counts.

    Global batches are consecutive slices of ``batch_size``; process p takes batches
    p, p + P, p + 2P, ... A process left without a batch in the last round gets a copy of
    the first batch with indices shifted by ``size`` (marked as padding).
    """

    def __init__(self, size: int, batch_size: int, num_processes: int = 1, process_index: int = 0):
        batches = [list(range(s, min(s + batch_size, size))) for s in range(0, size, batch_size)]
        rounds = math.ceil(len(batches) / num_processes)
        mine = batches[process_index::num_processes]
        self.batches = mine + [[size + i for i in batches[0]]] * (rounds - len(mine))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Flagged(torch.utils.data.Dataset):
    """Index i >= len(examples) is a padding copy of example i - len(examples)."""

    def __init__(self, examples: list):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        n = len(self.examples)
        return self.examples[i % n], i >= n


def example_tokens(example) -> int:
    """Tokens an example puts in a batch: its prompt once and each distinct completion."""
    return len(example.prompt_ids) + sum(len(c) for c in {tuple(c) for c in example.completions.values()})


def train_loader(examples: list, collator, batch_size: int, seed: int, accelerator, *,
                 max_tokens: int | None = None, group_by_length: bool = False) -> DataLoader:
    lengths = [example_tokens(e) for e in examples] if max_tokens or group_by_length else None
    window = GROUP_WINDOW * batch_size if group_by_length else 0
    if group_by_length and max_tokens:
        window = max(batch_size, GROUP_WINDOW * max_tokens // max(1, sum(lengths) // len(lengths)))
    sampler = EpochSampler(len(examples), seed, lengths=lengths, window=window)
    batches = MicroBatchSampler(sampler, batch_size, lengths, max_tokens)
    return accelerator.prepare_data_loader(DataLoader(examples, batch_sampler=batches, collate_fn=collator))


def eval_loader(examples: list, collator, batch_size: int, accelerator) -> DataLoader:
    """Not passed through accelerate (its even_batches would count repeats); batches are moved
    to the device by the evaluation loop."""
    sampler = EvalBatchSampler(len(examples), batch_size, accelerator.num_processes, accelerator.process_index)

    def collate(items):
        batch = collator([example for example, _ in items])
        batch.is_padding = all(padding for _, padding in items)
        return batch

    return DataLoader(_Flagged(examples), batch_sampler=sampler, collate_fn=collate)
