"""The padded layout: one sequence (prompt + completion) per row, right-padded, roles in
consecutive blocks. Every model and attention implementation takes it.

Exact tensors. With B pairs, rows 0..B-1 hold the chosen sequences and rows B..2B-1 the
rejected ones (an example whose completions are equal has one row for both). For one pair with prompt [11, 12], chosen [21, 22, 2] and rejected [31, 2],
pad id 0::

    input_ids        = [[11, 12, 21, 22, 2],
                        [11, 12, 31,  2, 0]]
    attention        = Attention(padding=[[1, 1, 1, 1, 1],
                                          [1, 1, 1, 1, 0]])   # segment, branch, position_ids: None
    token_row        = [0, 0, 0, 1, 1]
    token_pos        = [1, 2, 3, 1, 2]      # logits at pos t predict the token at t+1
    token_target     = [21, 22, 2, 31, 2]
    token_sequence   = [0, 0, 0, 1, 1]
    sequence_lengths = [3, 2]
    index            = {"chosen": [0], "rejected": [1]}
"""
from __future__ import annotations

import torch

from prefopt.data.collate.base import Attention, Batch, ScoredSequences, round_up
from prefopt.data.tokenize import EncodedExample


class PaddedCollator:
    layout = "padded"

    def __init__(self, pad_id: int, roles: tuple[str, ...], pad_to_multiple_of: int | None = None,
                 extras: tuple[str, ...] = ()):
        self.pad_id = pad_id
        self.roles = roles
        self.pad_to_multiple_of = pad_to_multiple_of
        self.extras = extras

    def __call__(self, examples: list[EncodedExample]) -> Batch:
        seqs = ScoredSequences(examples, self.roles)
        width = round_up(max(len(s.prompt) + len(s.completion) for s in seqs.sequences), self.pad_to_multiple_of)
        input_ids = torch.full((len(seqs.sequences), width), self.pad_id, dtype=torch.long)
        padding = torch.zeros((len(seqs.sequences), width), dtype=torch.long)
        for row, s in enumerate(seqs.sequences):
            ids = s.prompt + s.completion
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            padding[row, :len(ids)] = 1
            seqs.score(row, row, len(s.prompt) - 1, range(len(s.prompt), len(ids)))
        return seqs.batch(examples, input_ids, Attention(padding), self.extras,
                          prompts=[s.example for s in seqs.sequences])
