"""From a Batch's attention description to what an attention implementation takes.

transformers passes a ready 4D mask (or FlexAttention ``BlockMask``) straight to the
attention kernels, and reads packed sequences from ``position_ids`` when no mask is given.
So a layout needs, per implementation:

| implementation            | padded  | packed                      | shared (prompt + branches) |
|---------------------------|---------|-----------------------------|----------------------------|
| sdpa                      | 2D mask | 4D bool mask                | 4D bool mask               |
| prefopt_sdpa (below)      | 2D mask | SDPA per sequence           | SDPA per prompt and branch |
| eager                     | 2D mask | 4D additive float mask      | 4D additive float mask     |
| flex_attention            | 2D mask | BlockMask                   | BlockMask                  |
| flash_attention_2/3 (varlen) | 2D mask | position ids (cu_seqlens) | not possible: no tree masks |

Anything else (a kernel this table does not know) gets the padded layout.

``prefopt_sdpa`` is SDPA that, given the units of a packed or shared batch, attends piece by
piece instead of through one dense (T, T) mask: each prompt causally over itself, each
completion over its prompt and causally over itself. A dense mask makes a kernel compute
every (query, key) pair of the row, including those between a chosen and a rejected
completion and those across packed sequences; on CPU that is 1.7-3.4x the FLOPs for rows of
a prompt and two long completions (measured, bench/README.md). Called without units and with
a real mask (generation, a padded batch) it is plain SDPA; called without units but with the
placeholder mask a packed batch carries (a layer that drops keyword arguments), it raises
rather than attend across the whole row. The setup probe checks it reproduces the plain path.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from prefopt.data.collate import Batch

MASK_IMPLS = ("sdpa", "eager", "flex_attention", "prefopt_sdpa")
SPLIT_SDPA = "prefopt_sdpa"


def attn_implementation(model) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def supported_layouts(impl: str) -> tuple[str, ...]:
    if impl in MASK_IMPLS:
        return ("padded", "packed", "shared")
    if impl.startswith("flash_attention") or impl.endswith("flash_attention"):
        return ("padded", "packed")
    return ("padded",)


def model_inputs(batch: Batch, impl: str, dtype: torch.dtype = torch.float32) -> dict:
    """``input_ids``, ``attention_mask`` and ``position_ids`` for a forward pass of ``batch``, and
    its image tensors (``pixel_values``, ...: prefopt.vlm) when it has images."""
    return {**_text_inputs(batch, impl, dtype), **batch.media}


def _text_inputs(batch: Batch, impl: str, dtype: torch.dtype) -> dict:
    att = batch.attention
    if att.segment is None:
        return {"input_ids": batch.input_ids, "attention_mask": att.padding, "position_ids": att.position_ids}
    if impl not in MASK_IMPLS:  # varlen kernels: sequences from the position ids (no tree)
        if att.branch is not None:
            raise ValueError(f"attention implementation '{impl}' cannot take a shared-prompt batch")
        return {"input_ids": batch.input_ids, "attention_mask": None, "position_ids": att.position_ids}
    if impl == SPLIT_SDPA:
        # the units carry the structure; the 4D placeholder only stops transformers building a mask
        rows = batch.input_ids.shape[0]
        placeholder = torch.ones((rows, 1, 1, 1), dtype=torch.bool, device=batch.input_ids.device)
        return {"input_ids": batch.input_ids, "attention_mask": placeholder, "position_ids": att.position_ids,
                "prefopt_units": att.units}
    if impl == "flex_attention":
        mask = block_mask(batch)
    else:
        allowed = att.allowed()[:, None]                                  # (R, 1, T, T)
        mask = allowed if impl == "sdpa" else \
            torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return {"input_ids": batch.input_ids, "attention_mask": mask, "position_ids": att.position_ids}


def mask_mod(batch: Batch):
    """FlexAttention's ``mask_mod(b, h, q, kv)`` for a packed or shared batch: the same rule as
    ``Attention.allowed``, evaluated per (query, key) pair."""
    att = batch.attention
    seg = att.segment
    branch = att.branch if att.branch is not None else torch.zeros_like(seg)

    def allowed(b, h, q, kv):
        same = (seg[b, q] == seg[b, kv]) & (seg[b, kv] >= 0)
        visible = (branch[b, kv] == 0) | (branch[b, kv] == branch[b, q])
        return ((kv <= q) & same & visible) | (q == kv)
    return allowed


def block_mask(batch: Batch):
    """A FlexAttention BlockMask for a packed or shared batch: blocks no query of a block may
    see are skipped, so several units per row cost no quadratic extra."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, width = batch.input_ids.shape
    return create_block_mask(mask_mod(batch), B=rows, H=None, Q_LEN=width, KV_LEN=width,
                             device=batch.input_ids.device)


# ----------------------------------------------------------------------------- split SDPA

def register_split_sdpa() -> None:
    """Make ``prefopt_sdpa`` an attention implementation transformers dispatches to (its masks,
    when a caller passes no units, are SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SPLIT_SDPA, split_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SPLIT_SDPA, sdpa_mask)


def ensure_attention(model, impl: str) -> None:
    if attn_implementation(model) != impl:
        set_attention(model, impl)


def set_attention(model, impl: str) -> None:
    """Switch ``model`` (unwrapped) to attention implementation ``impl`` (not saved with its config)."""
    if impl == SPLIT_SDPA:
        register_split_sdpa()
    model.config._attn_implementation = impl


_MASKS: dict[tuple, torch.Tensor] = {}  # per (device, dtype): ones(N, 2N).tril(N), grown on demand
ADDITIVE_MASK_MAX = 2048  # longest side cached as an additive mask (fp32: 32 MiB); boolean beyond


def _branch_mask(length: int, prompt: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(length, prompt + length) mask: the whole prompt, then causal over the branch itself; a
    view of one cached mask (element (i, c) of the slice is allowed iff c <= i + prompt).
    Additive (0 or the dtype's minimum) in the query's dtype up to ADDITIVE_MASK_MAX, because
    SDPA's CPU kernel converts a boolean mask on every call (measured: ~8% of a branch's
    attention); boolean beyond, where an additive cache would cost hundreds of MiB."""
    n = max(length, prompt)
    additive = n <= ADDITIVE_MASK_MAX
    key = (str(device), dtype if additive else torch.bool)
    big = _MASKS.get(key)
    if big is None or big.shape[0] < n:
        size = max(n, 2 * (0 if big is None else big.shape[0]), 1024)
        if additive:
            size = min(size, ADDITIVE_MASK_MAX)
        big = torch.ones(size, 2 * size, dtype=torch.bool, device=device).tril(size)
        if additive:
            big = torch.zeros(big.shape, dtype=dtype, device=device).masked_fill_(~big, torch.finfo(dtype).min)
        _MASKS[key] = big
    size = big.shape[0]
    return big[:length, size - prompt:size + length]


def split_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: float | None = None, prefopt_units=None, **kwargs):
    """transformers attention function (query (R, H, T, D), key/value (R, Hkv, T, D)) returning
    (R, T, H, D). ``prefopt_units``: per row, (start, prompt length, branch lengths) of each unit."""
    if prefopt_units is None:
        if attention_mask is not None and attention_mask.shape[-2:] == (1, 1) and query.shape[2] > 1:
            raise RuntimeError("prefopt_sdpa got a packed batch's placeholder mask without its units: a layer "
                               "of this model does not pass keyword arguments to its attention; use "
                               "data.layout=padded or model.attn_implementation=eager")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    width = query.shape[2]
    attend = functools.partial(F.scaled_dot_product_attention, scale=scaling, enable_gqa=key.shape[1] != query.shape[1],
                               dropout_p=dropout if module.training else 0.0)
    rows = []
    # splits, not slices: the backward of a split is one concatenation, that of each slice a
    # zero-filled tensor of the whole input
    by_row = zip(query.split(1), key.split(1), value.split(1))
    for units, (q, k, v) in zip(prefopt_units, by_row):
        sizes = [n for _, prompt, branches in units for n in (prompt, *branches)]
        tail = width - sum(sizes)
        qs, ks, vs = (torch.split(t, sizes + [tail] * (tail > 0), dim=2) for t in (q, k, v))
        pieces, i = [], 0
        for _, prompt, branches in units:
            shared_k, shared_v = ks[i], vs[i]
            pieces.append(attend(qs[i], shared_k, shared_v, is_causal=True))
            for j, length in enumerate(branches, start=i + 1):
                pieces.append(attend(qs[j], torch.cat([shared_k, ks[j]], dim=2), torch.cat([shared_v, vs[j]], dim=2),
                                     attn_mask=_branch_mask(length, prompt, query.device, query.dtype)))
            i += 1 + len(branches)
        if tail:  # padding: never scored
            pieces.append(torch.zeros_like(qs[-1]))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None
