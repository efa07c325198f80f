"""The only code that turns a model's hidden states or logits into log-probs.

``score_batch`` runs a causal LM over a Batch and returns per-sequence statistics of the
*scored* tokens only (completion tokens; prompt and padding never enter): the summed
log-prob, the token count, and detached diagnostics. Policy and reference both go through
here, so a reference log-prob always comes from the same tokenisation, masking, layout and
precision as the policy's.

Where the LM head runs (``Scoring.head``), decided once per model at setup and verified
against the plain path on a probe batch (prefopt.scoring):

* ``full``: the model's own forward, logits at every position; the K scored rows are taken.
* ``scored``: the model's own forward with ``logits_to_keep`` set to the scored positions, so
  the head (and whatever the model does after it: soft-capping, scaling) runs on those only.
* ``fused``: a forward pre-hook on the output embedding takes the K scored hidden states and
  applies the head itself, in chunks of ``chunk_size`` scored tokens, each chunk recomputed in
  backward (activation checkpointing), so no (K, V) tensor larger than a chunk lives at once
  (per chunk: the logits, their float32 log-softmax and its gradient, about 3x the chunk's
  float32 logits at the peak). The hook runs inside the wrapped model's forward, so DDP hooks
  still fire; under FSDP/DeepSpeed the setup picks ``scored`` instead (prefopt.scoring).

Log-softmax is taken in float32 on the scored rows only. Per-token statistics that other
modules need (e.g. WPO's collision probability) are registered by name in ``TOKEN_STATS``
and summed per sequence into ``SequenceScores.stats``; this module knows no method.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from prefopt.attention import SPLIT_SDPA, attn_implementation, ensure_attention, model_inputs
from prefopt.data.collate import Batch
from prefopt.vlm import mrope_inputs

Tensor = torch.Tensor

# name -> fn(logprobs (k, V) float32, token_logps (k,)) -> (k,), computed without gradient.
TOKEN_STATS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {}
HEAD_MODES = ("full", "scored", "fused")
CHUNK_BYTES = 256 * 2**20  # default chunk: float32 logits of at most 256 MiB (peak ~3x that)
# Without gradient a chunk costs no recomputation, so the head runs in chunks whose logits stay in
# the CPU's cache for the log-softmax that reads them back (measured on this 2-core EPYC, 2769
# scored tokens x 8192 vocabulary: 270 ms in one chunk, 180 ms in chunks of 512 tokens).
NO_GRAD_CHUNK_BYTES = 16 * 2**20


def register_token_stat(name: str, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    TOKEN_STATS[name] = fn


@dataclass
class Scoring:
    """How a model is run and scored (see the module docstring)."""
    attn: str = "sdpa"               # attention implementation: which mask form the layouts need
    head: str = "full"               # full | scored | fused | reward (a reward model's scalar per sequence)
    chunk_size: int | None = None    # fused head: scored tokens per chunk (None: CHUNK_BYTES worth)
    dtype: torch.dtype = torch.float32  # the model's dtype (an eager additive mask is built in it)

    @classmethod
    def for_model(cls, model, head: str = "full", chunk_size: int | None = None) -> "Scoring":
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return cls(attn_implementation(unwrap_model(model)), head, chunk_size, dtype)


@dataclass
class SequenceScores:
    logps: Tensor         # (S,) Σ_t log p(y_t | x, y<t) over each sequence's scored tokens
    lengths: Tensor       # (S,) number of scored tokens
    logits_mean: Tensor   # (S,) mean logit over scored positions and vocabulary (detached)
    correct: Tensor       # (S,) scored tokens where argmax == target (detached)
    token_logps: Tensor | None = None     # (K,) log p of each scored token (LD-DPO's prefix sums)
    seq_kl: Tensor | None = None          # (S,) Σ_t KL(πref ‖ πθ), when reference log-probs given
    token_logprobs: Tensor | None = None  # (K, V) log-softmax, kept only when asked (reference side)
    stats: dict[str, Tensor] = field(default_factory=dict)  # (S,) sums of registered token stats


@dataclass
class TokenStats:
    """Per scored token, float32."""
    logps: Tensor                       # (k,) with gradient
    logit_mean: Tensor                  # (k,) detached
    correct: Tensor                     # (k,) detached
    kl: Tensor | None = None            # (k,) KL(πref ‖ πθ) at the token, with gradient
    logprobs: Tensor | None = None      # (k, V)
    stats: dict[str, Tensor] = field(default_factory=dict)

    @staticmethod
    def cat(parts: list["TokenStats"]) -> "TokenStats":
        def join(values):
            return None if values[0] is None else torch.cat(values)
        out = {f.name: join([getattr(p, f.name) for p in parts]) for f in fields(TokenStats) if f.name != "stats"}
        return TokenStats(**out, stats={k: torch.cat([p.stats[k] for p in parts]) for k in parts[0].stats})


def token_statistics(logits: Tensor, targets: Tensor, *, ref_logprobs: Tensor | None = None,
                     stats: tuple[str, ...] = (), keep_logprobs: bool = False, details: bool = True) -> TokenStats:
    """Statistics of the scored tokens from their logits (k, V).

    ``ref_logprobs`` (k, V) adds the token-level KL Σ_v πref(v) (log πref(v) − log πθ(v))
    (TDPO's D_SeqKL summands); ``stats`` names entries of TOKEN_STATS. One float32
    log-softmax serves everything (its backward is the fused softmax − one-hot, faster on CPU
    than logsumexp's). ``details=False`` skips the logged-only mean logit and argmax (zeros
    instead): a reference's are never read.
    """
    logits = logits.float()
    logprobs = logits.log_softmax(-1)                                              # (k, V)
    logps = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)                 # (k,)
    with torch.no_grad():
        if details:
            out = TokenStats(logps, logits.mean(-1), (logits.argmax(-1) == targets).float())
        else:
            zeros = logps.new_zeros(logps.shape)
            out = TokenStats(logps, zeros, zeros)
        out.stats = {name: TOKEN_STATS[name](logprobs.detach(), logps.detach()) for name in stats}
    if keep_logprobs:
        out.logprobs = logprobs
    if ref_logprobs is not None:
        out.kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)
    return out


def sequence_scores(token_logits: Tensor, batch: Batch, *, keep_token_logprobs: bool = False,
                    ref_token_logprobs: Tensor | None = None, token_stats: tuple[str, ...] = ()) -> SequenceScores:
    """Per-sequence statistics from the logits of the K scored tokens, (K, V)."""
    return by_sequence(token_statistics(token_logits, batch.token_target, ref_logprobs=ref_token_logprobs,
                                        stats=token_stats, keep_logprobs=keep_token_logprobs), batch)


def by_sequence(tok: TokenStats, batch: Batch) -> SequenceScores:
    seq, n, lengths = batch.token_sequence, batch.num_sequences, batch.sequence_lengths
    return SequenceScores(
        logps=_sum_by(tok.logps, seq, n), lengths=lengths,
        logits_mean=_sum_by(tok.logit_mean, seq, n) / lengths.clamp(min=1),
        correct=_sum_by(tok.correct, seq, n), token_logps=tok.logps,
        seq_kl=None if tok.kl is None else _sum_by(tok.kl, seq, n),
        token_logprobs=tok.logprobs,
        stats={name: _sum_by(values, seq, n) for name, values in tok.stats.items()})


def _sum_by(values: Tensor, seq: Tensor, n: int) -> Tensor:
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, seq, values)


def score_batch(model, batch: Batch, scoring: Scoring | None = None, *, keep_token_logprobs: bool = False,
                ref_token_logprobs: Tensor | None = None, token_stats: tuple[str, ...] = (),
                details: bool = True) -> SequenceScores:
    """Forward ``model`` over the batch and score its completion tokens (``details=False``: without
    the logged-only mean logit and argmax accuracy, as a reference needs)."""
    scoring = scoring or Scoring.for_model(model)
    if scoring.attn == SPLIT_SDPA and batch.attention.units is not None:
        ensure_attention(unwrap_model(model), SPLIT_SDPA)  # a trainer switches it back after training
    inputs = mrope_inputs(unwrap_model(model), model_inputs(batch, scoring.attn, scoring.dtype))
    if scoring.head == "reward":  # a reward model: the scalar of each sequence in the logps field
        from prefopt.rewards import reward_forward
        rewards = reward_forward(model, inputs, batch)
        zeros = torch.zeros_like(rewards)
        return SequenceScores(rewards, batch.sequence_lengths, zeros, zeros)
    want = dict(ref_logprobs=ref_token_logprobs, stats=token_stats, keep_logprobs=keep_token_logprobs,
                details=details)
    if scoring.head == "fused":
        tok = _fused_forward(model, inputs, batch, scoring.chunk_size, want)
    elif scoring.head == "scored":
        keep, where = scored_positions(batch)
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits       # (U, V)
        tok = token_statistics(logits[where], batch.token_target, **want)
    else:
        logits = model(**inputs, use_cache=False).logits                            # (R, T, V)
        tok = token_statistics(logits[batch.token_row, batch.token_pos], batch.token_target, **want)
    return by_sequence(tok, batch)


def scored_positions(batch: Batch) -> tuple[Tensor, Tensor]:
    """(R, T) bool mask of the positions whose logits are scored, and for each scored token the
    index of its position among the True ones in row-major order (``logits_to_keep`` order).
    A shared prompt's last position scores several first tokens: it is kept once."""
    rows, width = batch.input_ids.shape
    flat = batch.token_row * width + batch.token_pos
    unique, where = torch.unique(flat, return_inverse=True)
    keep = torch.zeros(rows * width, dtype=torch.bool, device=flat.device)
    keep[unique] = True
    return keep.view(rows, width), where


def unwrap_model(model):
    """The module under DDP/FSDP/DeepSpeed wrappers (a PeftModel stays a PeftModel)."""
    from accelerate.utils import extract_model_from_parallel
    return extract_model_from_parallel(model)


def output_head(model) -> torch.nn.Module | None:
    """The model's LM head when it is a plain ``nn.Linear`` (what the fused head can apply), else None."""
    getter = getattr(unwrap_model(model), "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if type(head) is torch.nn.Linear else None


def logit_postprocess(config) -> Callable[[Tensor], Tensor]:
    """What known causal LMs apply to the head's output: Gemma's soft-capping, Cohere's and
    Granite's logit scaling. Models doing anything else fail the setup check on a probe batch
    and use the ``scored`` or ``full`` head, which run the model's own code."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)

    def post(logits: Tensor) -> Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
    return post


def _fused_forward(model, inputs: dict, batch: Batch, chunk_size: int | None, want: dict) -> TokenStats:
    head = output_head(model)
    if head is None:
        raise ValueError("the fused LM head needs a plain nn.Linear output embedding")
    post = logit_postprocess(unwrap_model(model).config)
    chunk = chunk_size or max(64, CHUNK_BYTES // (4 * head.out_features))
    result: dict[str, TokenStats] = {}

    def run(hidden: Tensor, targets: Tensor, ref: Tensor | None) -> TokenStats:
        logits = post(F.linear(hidden, head.weight, head.bias))
        return token_statistics(logits, targets, **{**want, "ref_logprobs": ref})

    def pre_hook(module, args):
        states = args[0]                                                       # (R, T, H)
        hidden = states[batch.token_row, batch.token_pos]                      # (K, H)
        targets, ref = batch.token_target, want["ref_logprobs"]
        recompute = torch.is_grad_enabled() and hidden.requires_grad
        size = chunk if recompute or chunk_size else max(1, NO_GRAD_CHUNK_BYTES // (4 * head.out_features))
        if len(targets) <= size:
            result["tok"] = run(hidden, targets, ref)
        else:
            parts = []
            for s in range(0, len(targets), size):
                piece = (hidden[s:s + size], targets[s:s + size], None if ref is None else ref[s:s + size])
                parts.append(checkpoint(run, *piece, use_reentrant=False) if recompute else run(*piece))
            result["tok"] = TokenStats.cat(parts)
        return (states[..., :0, :],)  # the model's own head then runs on nothing

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return result["tok"]


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
