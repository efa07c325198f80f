"""Helpers shared by the loss families (one definition each)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prefopt.losses.base import LossInputs

Tensor = torch.Tensor


def log_ratios(inputs: LossInputs, reference_free: bool = False, average: bool = False):
    """(r_w, r_l): policy minus reference log-probs of chosen and rejected, shape (B,).

    ``reference_free`` uses an implicit uniform reference (log πref = 0); ``average``
    divides each log-prob by its completion length first (IPO, SimPO-style losses).
    """
    pc, pr = inputs.policy_chosen_logps, inputs.policy_rejected_logps
    rc = torch.zeros_like(pc) if reference_free else inputs.ref_chosen_logps
    rr = torch.zeros_like(pr) if reference_free else inputs.ref_rejected_logps
    r_w, r_l = pc - rc, pr - rr
    if average:
        r_w = average_logps(r_w, inputs.chosen_lengths)
        r_l = average_logps(r_l, inputs.rejected_lengths)
    return r_w, r_l


def average_logps(logps: Tensor, lengths: Tensor) -> Tensor:
    """Length-averaged log-prob log π(y|x)/|y| (lengths below 1 count as 1)."""
    return logps / lengths.clamp(min=1).to(logps.dtype)


def smoothed_logistic(logits: Tensor, eps: float = 0.0) -> Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z): the logistic loss with label smoothing ε (cDPO)."""
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
