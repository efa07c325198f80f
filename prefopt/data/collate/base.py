"""The ``Batch`` every collator returns, and the pieces the layouts share.

A Batch separates *what the model reads* (``input_ids`` and an ``Attention`` description)
from *what is scored*: a flat list of K scored tokens, each given by the row and position
whose logits predict it, its target id, and the sequence it belongs to. Per-sequence
log-probs are a scatter-sum over that list (prefopt.logps), so the log-prob code, the
reference strategies and the losses never change with the layout.

``Attention`` says, as data, which tokens of a row each token may attend to:

* ``segment is None``: one causal sequence per row, right-padded (``padding`` marks real
  tokens): the plain 2D padding mask every model accepts.
* ``segment`` (R, T): several sequences in a row. A token attends to earlier tokens of its
  own segment only (-1 marks padding), with ``position_ids`` restarting at 0 per segment.
* ``branch`` (R, T), with segments: a prompt shared by its completions. Branch 0 is the
  trunk (the prompt); a token of branch b > 0 attends to the trunk and to earlier tokens of
  branch b, never to another branch. Completions continue the prompt's positions.

prefopt.attention turns this into what an attention implementation takes (a 4D mask for
SDPA/eager, a BlockMask for FlexAttention, position ids for varlen kernels).

Every example carries a stable id (``example_ids``, a hash of its tokenised content), so a
cache of per-example values (the precomputed reference) can be keyed on it; ``index`` maps
each role ("chosen", "rejected", "completion", "kl", "ref_completion", "response_k") to the
sequence number of every example. Roles of one example whose token ids are equal share one sequence.

A completion with a scored-token mask (``EncodedExample.scored``: a multi-turn segment, whose
other-party turns are context) is placed whole, as any other, but only its masked-in tokens
enter the scored-token list; ``sequence_lengths`` counts scored tokens. So every layout, the
log-prob code and the losses honour the mask without knowing of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, replace

import torch

from prefopt.data.tokenize import RESPONSE_ROLE, SCORES, EncodedExample

Tensor = torch.Tensor


@dataclass
class Attention:
    padding: Tensor                    # (R, T) 1 = real token
    segment: Tensor | None = None      # (R, T) sequence (or shared unit) within the row; -1 padding
    branch: Tensor | None = None       # (R, T) 0 = shared prompt, b > 0 = completion b of its unit
    position_ids: Tensor | None = None  # (R, T) positions as the model must see them
    # The same structure, compact, for kernels that attend piece by piece (prefopt.attention):
    # per row, (start, prompt length, branch lengths) of each unit; a packed sequence is a
    # "prompt" of its full length with no branches.
    units: list[list[tuple[int, int, tuple[int, ...]]]] | None = None

    def allowed(self) -> Tensor:
        """(R, T, T) bool: may query position i attend to key position j. Padding attends to
        itself only, so no softmax row is empty (its output is never scored)."""
        rows, width = self.padding.shape
        idx = torch.arange(width, device=self.padding.device)
        causal = idx[None, :] <= idx[:, None]                                     # (T, T)
        if self.segment is None:
            real = self.padding.bool()
            ok = causal[None] & real[:, None, :] & real[:, :, None]
        else:
            seg = self.segment
            ok = causal[None] & (seg[:, :, None] == seg[:, None, :]) & (seg >= 0)[:, None, :]
            if self.branch is not None:
                q, k = self.branch[:, :, None], self.branch[:, None, :]
                ok &= (k == 0) | (k == q)
        return ok | torch.eye(width, dtype=torch.bool, device=ok.device)[None]


@dataclass
class Batch:
    input_ids: Tensor                 # (R, T)
    attention: Attention              # which tokens attend to which (see the module docstring)
    token_row: Tensor                 # (K,) row of the logits that score each token
    token_pos: Tensor                 # (K,) position of those logits
    token_target: Tensor              # (K,) token id scored there
    token_sequence: Tensor            # (K,) sequence each scored token belongs to (contiguous, in order)
    sequence_lengths: Tensor          # (S,) completion tokens per sequence
    index: dict[str, Tensor]          # role -> (B,) sequence numbers
    example_ids: Tensor               # (B,) int64 hash of each example's tokenised content
    labels: Tensor | None = None      # (B,) bool, unpaired data: True = desirable
    extras: dict[str, Tensor] = field(default_factory=dict)  # (B,) numeric columns
    is_padding: bool = False          # an evaluation filler batch: scored, never counted
    # Listwise data (roles response_0..response_{K-1}, best first): each example's scores, and
    # which of the K roles are its own responses (the others repeat its last one; see data.roles).
    response_scores: Tensor | None = None  # (B, K) float, 0 where response_mask is False
    response_mask: Tensor | None = None    # (B, K) bool
    # Image inputs (prefopt.vlm): the processor's tensors (``pixel_values``, ...) of every image
    # the rows hold, in the order their image tokens appear row-major (first dimension per image,
    # or per patch where ``image_grid_thw`` says how many each image has: Qwen2-VL).
    # The padded layout repeats an example's images in each of its rows; the shared layout holds
    # them once per example (its prompt once); the packed layout once per sequence.
    media: dict[str, Tensor] = field(default_factory=dict)

    @property
    def attention_mask(self) -> Tensor:
        """(R, T) 1 = real token (the padding mask; see ``attention`` for the full structure)."""
        return self.attention.padding

    @property
    def num_examples(self) -> int:
        return len(self.example_ids)

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens the model reads: the throughput unit."""
        return int(self.attention.padding.sum())

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return _move(self, device, non_blocking)


def _move(value, device, non_blocking):
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, dict):
        return {k: _move(v, device, non_blocking) for k, v in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: _move(getattr(value, f.name), device, non_blocking)
                                 for f in fields(value)})
    return value


@dataclass
class Sequence:
    """One completion to score: example ``example``'s ``completion`` after its prompt."""
    example: int
    prompt: list[int]
    completion: list[int]
    scored: list[bool] | None = None  # per completion token; None: every token is scored

    @property
    def num_scored(self) -> int:
        return len(self.completion) if self.scored is None else sum(self.scored)


class ScoredSequences:
    """The sequences of a list of examples, numbered role-major, with equal completions of one
    example shared (SLiC's absent ``ref_completion`` is its chosen: no extra row), and the
    scored-token list built as each layout places them."""

    def __init__(self, examples: list[EncodedExample], roles: tuple[str, ...]):
        self.sequences: list[Sequence] = []
        self.index: dict[str, list[int]] = {role: [0] * len(examples) for role in roles}
        own: list[dict[tuple, int]] = [{} for _ in examples]
        for ex in examples:
            if not ex.prompt_ids:  # the first completion token is predicted from the last prompt position
                raise ValueError(f"{ex.origin}: an example with no prompt tokens cannot be scored")
        for role in roles:
            for i, ex in enumerate(examples):
                ids, mask = ex.completions[role], ex.scored.get(role)
                key = (tuple(ids), None if mask is None else tuple(mask))
                if key not in own[i]:
                    own[i][key] = len(self.sequences)
                    self.sequences.append(Sequence(i, ex.prompt_ids, ids, mask))
                self.index[role][i] = own[i][key]
        self.rows: list[int] = []
        self.pos: list[int] = []
        self.target: list[int] = []
        self.seq: list[int] = []

    def score(self, number: int, row: int, first_logit: int, next_logits: range) -> None:
        """Score sequence ``number``: its first token from the logits at ``first_logit`` (the
        last prompt position), the others from ``next_logits`` (positions of its own tokens)."""
        sequence = self.sequences[number]
        completion = sequence.completion
        positions = [first_logit, *next_logits[:len(completion) - 1]]
        if sequence.scored is not None:  # a segment: its masked-out tokens are context only
            kept = [t for t, scored in enumerate(sequence.scored) if scored]
            positions, completion = [positions[t] for t in kept], [completion[t] for t in kept]
        self.rows += [row] * len(completion)
        self.pos += positions
        self.target += completion
        self.seq += [number] * len(completion)

    def batch(self, examples: list[EncodedExample], input_ids: Tensor, attention: Attention,
              extras: tuple[str, ...], prompts: list[int] | None = None) -> Batch:
        """``prompts``: the example of every prompt copy placed, row-major (their images, in order,
        become ``Batch.media``)."""
        long = torch.long
        seq = torch.tensor(self.seq, dtype=long)
        order = seq.argsort(stable=True)  # each sequence's tokens contiguous and in order
        return Batch(
            input_ids=input_ids, attention=attention,
            token_row=torch.tensor(self.rows, dtype=long)[order],
            token_pos=torch.tensor(self.pos, dtype=long)[order],
            token_target=torch.tensor(self.target, dtype=long)[order],
            token_sequence=seq[order],
            sequence_lengths=torch.tensor([s.num_scored for s in self.sequences], dtype=long),
            index={role: torch.tensor(v, dtype=long) for role, v in self.index.items()},
            example_ids=torch.tensor([e.uid for e in examples], dtype=torch.int64),
            labels=(torch.tensor([bool(e.label) for e in examples])
                    if examples and examples[0].label is not None else None),
            extras={name: torch.tensor([float(e.extras[name]) for e in examples], dtype=torch.float32)
                    for name in extras},
            **self.responses(examples),
            media=media_of([examples[i] for i in (prompts or [])]),
        )

    def responses(self, examples: list[EncodedExample]) -> dict[str, Tensor]:
        """``response_scores`` and ``response_mask`` (B, K) for listwise roles; nothing otherwise."""
        k = sum(1 for role in self.index if role.startswith(RESPONSE_ROLE.format("")))
        if not k:
            return {}
        scores = torch.zeros(len(examples), k, dtype=torch.float32)
        mask = torch.zeros(len(examples), k, dtype=torch.bool)
        for i, e in enumerate(examples):
            own = e.extras[SCORES]
            if len(own) > k:
                raise ValueError(f"{e.origin}: {len(own)} responses, more than the {k} the objective takes")
            scores[i, :len(own)] = torch.tensor(own, dtype=torch.float32)
            mask[i, :len(own)] = True
        return {"response_scores": scores, "response_mask": mask}


def media_of(placed: list[EncodedExample]) -> dict[str, Tensor]:
    """The image tensors of the placed prompt copies, concatenated along the image dimension."""
    keys = {k for e in placed for k in e.media}
    if not keys:
        return {}
    if any(set(e.media) != keys for e in placed):
        raise ValueError("a batch mixes examples with and without images; every example of an image "
                         "batch needs its images (the model reads one image tensor per batch)")
    return {k: torch.cat([e.media[k] for e in placed]) for k in sorted(keys)}


def round_up(width: int, multiple: int | None) -> int:
    return -(-width // multiple) * multiple if multiple else width
