"""The only code that turns logits into log-probs.

``score_batch`` runs a causal LM over a Batch and returns per-sequence statistics of the
*scored* tokens only (completion tokens; prompt and padding never enter): the summed
log-prob, the token count, and detached diagnostics. Policy and reference both go through
here, so a reference log-prob always comes from the same tokenisation, masking and
precision as the policy's.

Log-softmax is taken in float32 on the K scored rows only: under bf16 autocast the (K, V)
slice is upcast, never the full (R, T, V) logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prefopt.data.collate import Batch

Tensor = torch.Tensor


@dataclass
class SequenceScores:
    logps: Tensor         # (S,) Σ_t log p(y_t | x, y<t) over each sequence's scored tokens
    lengths: Tensor       # (S,) number of scored tokens
    logits_mean: Tensor   # (S,) mean logit over scored positions and vocabulary (detached)
    correct: Tensor       # (S,) scored tokens where argmax == target (detached)
    token_logps: Tensor | None = None     # (K,) log p of each scored token (LD-DPO's prefix sums)
    seq_kl: Tensor | None = None          # (S,) Σ_t KL(πref ‖ πθ), when reference log-probs given
    token_logprobs: Tensor | None = None  # (K, V) log-softmax, kept only when asked (reference side)
    wpo_log_weight: Tensor | None = None  # (S,) WPO: mean_t [log p(y_t) − log Σ_v p(v)²] (detached)


def token_logps(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """log p(target) for each row of ``logits`` (K, V), and the float32 log-normaliser.

    Equivalent to ``logits.log_softmax(-1).gather(-1, targets[:, None])`` without
    materialising the (K, V) log-softmax.
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)                           # (K,)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)   # (K,)
    return picked - lse, lse


def sequence_scores(token_logits: Tensor, batch: Batch, *, keep_token_logprobs: bool = False,
                    ref_token_logprobs: Tensor | None = None, wpo: bool = False) -> SequenceScores:
    """Per-sequence statistics from the logits of the K scored tokens, (K, V).

    ``ref_token_logprobs`` (K, V), when given, adds the token-level KL sum
    Σ_t Σ_v πref(v) (log πref(v) − log πθ(v)) per sequence (TDPO's D_SeqKL).
    ``wpo`` adds WPO's length-normalised log weight (Zhou et al. 2024, eq. 2 with the
    sampling-distribution alignment of §3.2): mean over tokens of log p(y_t) − log Σ_v p(v)².
    """
    seq, n = batch.token_sequence, batch.num_sequences
    logps, lse = token_logps(token_logits, batch.token_target)
    out = SequenceScores(
        logps=torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, seq, logps),
        lengths=batch.sequence_lengths,
        logits_mean=_sum_by(token_logits.detach().float().mean(-1), seq, n)
        / batch.sequence_lengths.clamp(min=1),
        correct=_sum_by((token_logits.detach().argmax(-1) == batch.token_target).float(), seq, n),
        token_logps=logps,
    )
    if wpo:
        with torch.no_grad():
            logprobs = token_logits.detach().float() - lse.detach().unsqueeze(-1)  # (K, V)
            adjusted = logps.detach() - torch.logsumexp(2 * logprobs, dim=-1)      # (K,)
            out.wpo_log_weight = _sum_by(adjusted, seq, n) / batch.sequence_lengths.clamp(min=1)
    if keep_token_logprobs or ref_token_logprobs is not None:
        policy_logprobs = token_logits.float() - lse.unsqueeze(-1)  # (K, V)
        if keep_token_logprobs:
            out.token_logprobs = policy_logprobs
        if ref_token_logprobs is not None:
            kl = (ref_token_logprobs.exp() * (ref_token_logprobs - policy_logprobs)).sum(-1)  # (K,)
            out.seq_kl = torch.zeros(n, dtype=kl.dtype, device=kl.device).index_add(0, seq, kl)
    return out


def _sum_by(values: Tensor, seq: Tensor, n: int) -> Tensor:
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, seq, values)


def score_batch(model, batch: Batch, *, keep_token_logprobs: bool = False,
                ref_token_logprobs: Tensor | None = None, wpo: bool = False) -> SequenceScores:
    """Forward ``model`` over the batch and score its completion tokens."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False)
    token_logits = out.logits[batch.token_row, batch.token_pos]  # (K, V)
    return sequence_scores(token_logits, batch, keep_token_logprobs=keep_token_logprobs,
                           ref_token_logprobs=ref_token_logprobs, wpo=wpo)


def prefix_logps(scores: SequenceScores, batch: Batch, limits: Tensor) -> Tensor:
    """(S,) sum of the log-probs of each sequence's first ``limits[s]`` scored tokens.

    Scored tokens of a sequence appear in order in the token list, so a token's rank
    within its sequence is its index minus the index of the sequence's first token.
    """
    seq = batch.token_sequence
    first = torch.full((batch.num_sequences,), len(seq), dtype=torch.long, device=seq.device)
    first = first.scatter_reduce(0, seq, torch.arange(len(seq), device=seq.device), reduce="amin")
    rank = torch.arange(len(seq), device=seq.device) - first[seq]
    keep = (rank < limits[seq]).to(scores.token_logps.dtype)
    return _sum_by(scores.token_logps * keep, seq, batch.num_sequences)
