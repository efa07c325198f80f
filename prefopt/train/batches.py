"""Batch orders for training and evaluation.

Training: a seeded permutation per epoch (``EpochSampler``), cut into micro-batches; under
several processes accelerate shards those batches and fills a short last round by
repeating the first examples (its ``even_batches``), so every process takes full batches.
In one process a last batch smaller than the objective needs (KTO's mismatched pairs need
two examples) joins the batch before it instead of being dropped.

Evaluation must count every example exactly once, on any number of processes, while every
process still runs the same number of forward passes (a sharded model's forward is a
collective). ``EvalBatchSampler`` deals batches round-robin and gives a process that has
run out a *padding* batch, which is scored but not counted.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler


class EpochSampler(Sampler):
    """A seeded permutation per epoch: the order of epoch e is a function of (seed, e) only,
    so a resumed run sees exactly the batches the uninterrupted run would have seen."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.size))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=gen).tolist())

    def __len__(self) -> int:
        return self.size


class TailMergingBatchSampler(BatchSampler):
    """Batches of ``batch_size``; a last batch smaller than ``min_size`` joins the one before it."""

    def __init__(self, sampler: Sampler, batch_size: int, min_size: int = 1):
        super().__init__(sampler, batch_size, drop_last=False)
        self.min_size = min_size

    def __iter__(self):
        batches = list(super().__iter__())
        if len(batches) > 1 and len(batches[-1]) < self.min_size:
            tail = batches.pop()
            batches[-1] = batches[-1] + tail
        return iter(batches)

    def __len__(self) -> int:
        n = super().__len__()
        tail = len(self.sampler) % self.batch_size
        return n - 1 if n > 1 and 0 < tail < self.min_size else n


class EvalBatchSampler(Sampler):
    """This process's share of the evaluation batches, in order, padded to equal counts.

    Global batches are consecutive slices of ``batch_size``; process p takes batches
    p, p + P, p + 2P, ... A process left without a batch in the last round gets a copy of
    the first batch with indices shifted by ``size`` (marked as padding).
    """

    def __init__(self, size: int, batch_size: int, num_processes: int = 1, process_index: int = 0,
                 min_size: int = 1):
        batches = list(TailMergingBatchSampler(range(size), batch_size, min_size))
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


def train_loader(examples: list, collator, batch_size: int, seed: int, min_size: int, accelerator) -> DataLoader:
    # Several processes: accelerate fills short batches itself, so no merging (it would
    # break its equal-batch sharding).
    merge = min_size if accelerator.num_processes == 1 else 1
    batches = TailMergingBatchSampler(EpochSampler(len(examples), seed), batch_size, merge)
    return accelerator.prepare_data_loader(DataLoader(examples, batch_sampler=batches, collate_fn=collator))


def eval_loader(examples: list, collator, batch_size: int, min_size: int, accelerator) -> DataLoader:
    """Not passed through accelerate (its even_batches would count repeats); batches are moved
    to the device by the evaluation loop."""
    sampler = EvalBatchSampler(len(examples), batch_size, accelerator.num_processes, accelerator.process_index,
                               min_size)

    def collate(items):
        batch = collator([example for example, _ in items])
        batch.is_padding = all(padding for _, padding in items)
        return batch

    return DataLoader(_Flagged(examples), batch_sampler=sampler, collate_fn=collate)
