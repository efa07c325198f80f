"""From a Batch's attention description to what an attention implementation takes.

transformers passes a ready 4D mask (or FlexAttention ``BlockMask``) straight to the
attention kernels, and reads packed sequences from ``position_ids`` when no mask is given.
So a layout needs, per implementation:

| implementation            | padded  | packed                      | shared (prompt + branches) |
|---------------------------|---------|-----------------------------|----------------------------|
| sdpa                      | 2D mask | 4D bool mask                | 4D bool mask               |
| eager                     | 2D mask | 4D additive float mask      | 4D additive float mask     |
| flex_attention            | 2D mask | BlockMask                   | BlockMask                  |
| flash_attention_2/3 (varlen) | 2D mask | position ids (cu_seqlens) | not possible: no tree masks |

Anything else (a kernel this table does not know) gets the padded layout.
"""
from __future__ import annotations

import torch

from prefopt.data.collate import Batch

MASK_IMPLS = ("sdpa", "eager", "flex_attention")


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
    """``input_ids``, ``attention_mask`` and ``position_ids`` for a forward pass of ``batch``."""
    att = batch.attention
    if att.segment is None:
        return {"input_ids": batch.input_ids, "attention_mask": att.padding, "position_ids": att.position_ids}
    if impl not in MASK_IMPLS:  # varlen kernels: sequences from the position ids (no tree)
        if att.branch is not None:
            raise ValueError(f"attention implementation '{impl}' cannot take a shared-prompt batch")
        return {"input_ids": batch.input_ids, "attention_mask": None, "position_ids": att.position_ids}
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
