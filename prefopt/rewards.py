"""Reward models: a scalar per sequence from a sequence-classification head, in any layout.

A reward model is ``AutoModelForSequenceClassification`` with ``num_labels=1`` on a causal
LM body (transformers adds a ``score`` head: Linear(hidden, 1)). Its own pooling takes the
last non-padding token of each *row*, which is wrong for packed and prompt-shared rows. So
the head's per-position output (R, T, 1) is captured by a forward hook and read at the last
token of each *sequence*: one past its last scored position (the EOS of the completion),
which sees the prompt and that completion only. The model's own forward still runs whole
(DDP/FSDP hooks fire); the hook only reads.
"""
from __future__ import annotations

import torch
from torch import Tensor

from prefopt.data.collate import Batch

HEAD_NAMES = ("score", "classifier", "v_head")


def reward_head(model) -> torch.nn.Module:
    from prefopt.logps import unwrap_model

    raw = unwrap_model(model)
    for name in HEAD_NAMES:
        head = getattr(raw, name, None) or getattr(getattr(raw, "base_model", None), name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise ValueError(f"{type(raw).__name__} has no reward head ({', '.join(HEAD_NAMES)}): load the model with "
                     "AutoModelForSequenceClassification(num_labels=1) (prefopt rm does)")


def last_positions(batch: Batch) -> tuple[Tensor, Tensor]:
    """(row, position) of each sequence's last token: one past its last scored position."""
    seq, n = batch.token_sequence, batch.num_sequences
    last = torch.full((n,), -1, dtype=torch.long, device=seq.device)
    last = last.scatter_reduce(0, seq, batch.token_pos, reduce="amax")
    row = torch.zeros(n, dtype=torch.long, device=seq.device).scatter(0, seq, batch.token_row)
    return row, last + 1


def reward_forward(model, inputs: dict, batch: Batch) -> Tensor:
    """(S,) float32 reward of every sequence of the batch."""
    captured = {}
    handle = reward_head(model).register_forward_hook(lambda module, args, out: captured.__setitem__("out", out))
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    values = captured["out"]                                  # (R, T, 1)
    row, pos = last_positions(batch)
    return values[row, pos, 0].float()


def pair_rewards(model, loader, scoring) -> tuple[Tensor, Tensor]:
    """Rewards of every (chosen, rejected) pair a loader yields, on this process."""
    from prefopt.logps import score_batch

    chosen, rejected = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                r = score_batch(model, batch, scoring).logps
                chosen.append(r[batch.index["chosen"]].cpu())
                rejected.append(r[batch.index["rejected"]].cpu())
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def calibration(chosen: Tensor, rejected: Tensor, bins: int = 5) -> dict:
    """Pairwise accuracy, and a calibration table: the pairs binned by the model's confidence
    in the response it prefers, max(p, 1 − p) with p = σ(r_w − r_l), against how often that
    preferred response is the labelled chosen one. A calibrated model's accuracy in each bin
    is close to its mean confidence."""
    p = torch.sigmoid((chosen - rejected).double())
    confidence = torch.maximum(p, 1 - p)
    right = (p > 0.5).double()
    edges = torch.linspace(0.5, 1.0, bins + 1, dtype=torch.float64)
    table = []
    for i in range(bins):
        lo, hi = float(edges[i]), float(edges[i + 1])
        inside = (confidence >= lo) & ((confidence < hi) if i < bins - 1 else (confidence <= hi))
        n = int(inside.sum())
        table.append({"confidence": f"{lo:.1f}-{hi:.1f}", "pairs": n,
                      "mean_confidence": float(confidence[inside].mean()) if n else None,
                      "accuracy": float(right[inside].mean()) if n else None})
    return {"pairs": len(p), "accuracy": float(right.mean()) if len(p) else None,
            "mean_margin": float((chosen - rejected).mean()) if len(p) else None, "calibration": table}


def calibration_markdown(result: dict) -> str:
    lines = [f"pairwise accuracy {result['accuracy']:.4f} over {result['pairs']} pairs, mean margin "
             f"{result['mean_margin']:.4f}", "", "| confidence | pairs | mean confidence | accuracy |",
             "|---|---:|---:|---:|"]
    for row in result["calibration"]:
        conf = "–" if row["mean_confidence"] is None else f"{row['mean_confidence']:.3f}"
        acc = "–" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        lines.append(f"| {row['confidence']} | {row['pairs']} | {conf} | {acc} |")
    return "\n".join(lines) + "\n"
