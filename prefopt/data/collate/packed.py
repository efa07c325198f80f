"""Padding-free layouts: several units per row, placed first-fit-decreasing up to a row budget.

* ``packed``: a unit is one sequence (prompt + completion); several per row, each attending
  to itself only, positions restarting at 0.
* ``shared``: a unit is one example: its prompt once, then each of its distinct completions
  (chosen and rejected; KTO's mismatched completion; K responses later). Every completion
  attends to the single copy of its prompt and to itself, never to a sibling, and continues
  the prompt's positions, so each completion sees exactly what it would see alone. The last
  prompt position predicts the first token of every completion.

Exact tensors, ``shared``. One pair with prompt [11, 12], chosen [21, 22, 2], rejected [31, 2],
pad id 0::

    input_ids      = [[11, 12, 21, 22,  2, 31,  2]]
    attention      = Attention(padding=[[1, 1, 1, 1, 1, 1, 1]],
                               segment=[[0, 0, 0, 0, 0, 0, 0]],
                               branch=[[0, 0, 1, 1, 1, 2, 2]],
                               position_ids=[[0, 1, 2, 3, 4, 2, 3]],
                               units=[[(0, 2, (3, 2))]])       # (start, prompt, branch lengths)
    token_row      = [0, 0, 0, 0, 0]
    token_pos      = [1, 2, 3, 1, 5]      # position 1 (last prompt token) predicts 21 and 31
    token_target   = [21, 22, 2, 31, 2]
    token_sequence = [0, 0, 0, 1, 1]
    index          = {"chosen": [0], "rejected": [1]}

The row budget (``max_tokens_per_row``) defaults to the longest unit of the batch: rows are
never longer than that unit alone would be, so attention cost per row never grows, and short
units fill the room that padding would have taken.
"""
from __future__ import annotations

import torch

from prefopt.data.collate.base import Attention, Batch, ScoredSequences, round_up
from prefopt.data.tokenize import EncodedExample


class PackedCollator:
    def __init__(self, pad_id: int, roles: tuple[str, ...], *, share_prompt: bool,
                 max_tokens_per_row: int | None = None, pad_to_multiple_of: int | None = None,
                 extras: tuple[str, ...] = ()):
        self.pad_id = pad_id
        self.roles = roles
        self.share_prompt = share_prompt
        self.layout = "shared" if share_prompt else "packed"
        self.max_tokens_per_row = max_tokens_per_row
        self.pad_to_multiple_of = pad_to_multiple_of
        self.extras = extras

    def units(self, seqs: ScoredSequences) -> list[list[int]]:
        """Sequence numbers per unit: one example's sequences (shared), or one sequence (packed)."""
        if not self.share_prompt:
            return [[n] for n in range(len(seqs.sequences))]
        by_example: dict[int, list[int]] = {}
        for n, s in enumerate(seqs.sequences):
            by_example.setdefault(s.example, []).append(n)
        return list(by_example.values())

    def unit_length(self, seqs: ScoredSequences, unit: list[int]) -> int:
        first = seqs.sequences[unit[0]]
        return len(first.prompt) + sum(len(seqs.sequences[n].completion) for n in unit)

    def __call__(self, examples: list[EncodedExample]) -> Batch:
        seqs = ScoredSequences(examples, self.roles)
        units = self.units(seqs)
        lengths = [self.unit_length(seqs, u) for u in units]
        budget = max(self.max_tokens_per_row or 0, max(lengths))
        rows: list[list[int]] = []      # unit numbers per row
        room: list[int] = []
        for u in sorted(range(len(units)), key=lambda u: -lengths[u]):  # first-fit decreasing
            row = next((r for r, left in enumerate(room) if left >= lengths[u]), None)
            if row is None:
                rows.append([])
                room.append(budget)
                row = len(rows) - 1
            rows[row].append(u)
            room[row] -= lengths[u]
        width = round_up(max(budget - left for left in room), self.pad_to_multiple_of)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        padding = torch.zeros(shape, dtype=torch.long)
        segment = torch.full(shape, -1, dtype=torch.long)
        branch = torch.zeros(shape, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long)
        pieces: list[list[tuple[int, int, tuple[int, ...]]]] = []
        placed: list[int] = []  # the example of each prompt copy, row-major (its images, prefopt.vlm)
        for r, row_units in enumerate(rows):
            offset = 0
            pieces.append([])
            for slot, u in enumerate(row_units):
                prompt = seqs.sequences[units[u][0]].prompt
                placed.append(seqs.sequences[units[u][0]].example)
                end = offset + len(prompt)
                input_ids[r, offset:end] = torch.tensor(prompt, dtype=torch.long)
                positions[r, offset:end] = torch.arange(len(prompt))
                for b, n in enumerate(units[u], start=1):
                    completion = seqs.sequences[n].completion
                    start, stop = end, end + len(completion)
                    input_ids[r, start:stop] = torch.tensor(completion, dtype=torch.long)
                    positions[r, start:stop] = torch.arange(len(prompt), len(prompt) + len(completion))
                    branch[r, start:stop] = b
                    seqs.score(n, r, offset + len(prompt) - 1, range(start, stop))
                    end = stop
                padding[r, offset:end] = 1
                segment[r, offset:end] = slot
                branches = tuple(len(seqs.sequences[n].completion) for n in units[u])
                pieces[r].append((offset, len(prompt), branches) if self.share_prompt else (offset, end - offset, ()))
                offset = end
            # padding continues as its own positions: varlen kernels read it as one more sequence
            positions[r, offset:] = torch.arange(width - offset)
        attention = Attention(padding, segment, branch if self.share_prompt else None, positions, pieces)
        return seqs.batch(examples, input_ids, attention, self.extras, prompts=placed)
