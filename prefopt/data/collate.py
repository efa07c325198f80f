"""Collate encoded examples into a ``Batch``.

A Batch separates *what the model reads* (``input_ids``, ``attention_mask``,
``position_ids``) from *what is scored*: a flat list of K scored tokens, each given by
the row and position whose logits predict it, its target id, and the sequence it belongs
to. Per-sequence log-probs are then a scatter-sum over that list (prefopt.logps). This
one representation covers every layout: padded (one sequence per row, below), packed
(several sequences per row) and prompt-shared (prompt encoded once, chosen and rejected
branching from it, where the last prompt position predicts the first token of both), so
the log-prob code, the reference strategies and the losses never change with the layout.

``index`` maps each role ("chosen", "rejected", "completion", "kl", "ref_completion") to
the sequence number of every example, shape (B,).

Padded layout, exact tensors. With B pairs, rows 0..B-1 hold the chosen sequences and rows
B..2B-1 the rejected ones. For one pair with prompt [11, 12], chosen [21, 22, 2] and
rejected [31, 2], pad id 0::

    input_ids       = [[11, 12, 21, 22, 2],
                       [11, 12, 31,  2, 0]]
    attention_mask  = [[1, 1, 1, 1, 1],
                       [1, 1, 1, 1, 0]]
    token_row       = [0, 0, 0, 1, 1]
    token_pos       = [1, 2, 3, 1, 2]      # logits at pos t predict the token at t+1
    token_target    = [21, 22, 2, 31, 2]
    token_sequence  = [0, 0, 0, 1, 1]
    sequence_lengths = [3, 2]
    index           = {"chosen": [0], "rejected": [1]}
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from prefopt.data.tokenize import EncodedExample

Tensor = torch.Tensor


@dataclass
class Batch:
    input_ids: Tensor                 # (R, T)
    attention_mask: Tensor            # (R, T) 1 = real token
    token_row: Tensor                 # (K,) row of the logits that score each token
    token_pos: Tensor                 # (K,) position of those logits
    token_target: Tensor              # (K,) token id scored there
    token_sequence: Tensor            # (K,) sequence each scored token belongs to
    sequence_lengths: Tensor          # (S,) completion tokens per sequence
    index: dict[str, Tensor]          # role -> (B,) sequence numbers
    labels: Tensor | None = None      # (B,) bool, unpaired data: True = desirable
    extras: dict[str, Tensor] = field(default_factory=dict)  # (B,) numeric columns
    position_ids: Tensor | None = None  # (R, T) for layouts that need them (packed, shared)
    is_padding: bool = False          # an evaluation filler batch: scored, never counted

    @property
    def num_examples(self) -> int:
        return len(next(iter(self.index.values())))

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens the model reads: the throughput unit."""
        return int(self.attention_mask.sum())

    def to(self, device, non_blocking: bool = False) -> "Batch":
        def move(v):
            if isinstance(v, Tensor):
                return v.to(device, non_blocking=non_blocking)
            if isinstance(v, dict):
                return {k: move(x) for k, x in v.items()}
            return v
        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})


class PaddedCollator:
    """One sequence (prompt + completion) per row, right-padded; roles in consecutive blocks.

    ``roles`` lists the completions to score per example, e.g. ("chosen", "rejected") or
    ("completion",). The "kl" role pairs prompt i with the completion of example
    (i + 1) mod B: the mismatched pairs of KTO's reference point z0. The "ref_completion"
    role (SLiC's regularisation target) gets a row only for examples that have one; the
    others point at their chosen row, so a dataset without the column costs nothing.
    """

    def __init__(self, pad_id: int, roles: tuple[str, ...], pad_to_multiple_of: int | None = None,
                 extras: tuple[str, ...] = ()):
        self.pad_id = pad_id
        self.roles = roles
        self.pad_to_multiple_of = pad_to_multiple_of
        self.extras = extras

    def sequences(self, examples: list[EncodedExample]):
        """(role, example number, prompt ids, completion ids) for every row, role-major."""
        n = len(examples)
        for role in self.roles:
            for i, ex in enumerate(examples):
                if role == "kl":
                    yield role, i, ex.prompt_ids, examples[(i + 1) % n].completions["completion"]
                elif role == "ref_completion" and role not in ex.completions:
                    continue  # shares the chosen row (see __call__)
                else:
                    yield role, i, ex.prompt_ids, ex.completions[role]

    def __call__(self, examples: list[EncodedExample]) -> Batch:
        rows = list(self.sequences(examples))
        width = max(len(p) + len(c) for _, _, p, c in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        tok_row, tok_pos, tok_target, tok_seq, lengths = [], [], [], [], []
        index: dict[str, list[int]] = {role: [0] * len(examples) for role in self.roles}
        for r, (role, i, prompt, completion) in enumerate(rows):
            ids = prompt + completion
            input_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, :len(ids)] = 1
            start = len(prompt)
            tok_row += [r] * len(completion)
            tok_pos += range(start - 1, len(ids) - 1)
            tok_target += completion
            tok_seq += [r] * len(completion)
            lengths.append(len(completion))
            index[role][i] = r
        if "ref_completion" in index:
            for i, ex in enumerate(examples):
                if "ref_completion" not in ex.completions:
                    index["ref_completion"][i] = index["chosen"][i]
        return Batch(
            input_ids=input_ids, attention_mask=attention_mask,
            token_row=torch.tensor(tok_row, dtype=torch.long),
            token_pos=torch.tensor(tok_pos, dtype=torch.long),
            token_target=torch.tensor(tok_target, dtype=torch.long),
            token_sequence=torch.tensor(tok_seq, dtype=torch.long),
            sequence_lengths=torch.tensor(lengths, dtype=torch.long),
            index={role: torch.tensor(v, dtype=torch.long) for role, v in index.items()},
            labels=(torch.tensor([bool(e.label) for e in examples])
                    if examples[0].label is not None else None),
            extras={name: torch.tensor([float(e.extras[name]) for e in examples], dtype=torch.float32)
                    for name in self.extras},
        )
