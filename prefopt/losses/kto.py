"""Kahneman–Tversky Optimization: unpaired KTO, and its paired variant ``kto_pair``.

KTO (Ethayarajh et al. 2024, arXiv:2402.01306) learns from completions labelled desirable or
undesirable, one per example, instead of preference pairs. Its value function compares the
implicit reward r = log πθ(y|x) − log πref(y|x) with a reference point z0, an estimate of
KL(πθ ‖ πref) that is clamped at 0 and never back-propagated through.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prefopt.losses.base import LossInputs, LossOutput, param, register
from prefopt.losses.common import log_ratios


Z0_CHOICES = ("batch", "zero")


def _kto_inputs(p) -> tuple[str, ...]:
    needed = ("labels",)
    return needed + ("policy_kl_logps", "ref_kl_logps") if p.z0 == "batch" else needed


@dataclass
class KTOParams:
    beta: float = param(0.1, "β: scale of the implicit reward r = log πθ(y|x) − log πref(y|x) inside "
                             "the value function.", gt=0)
    desirable_weight: float = param(1.0, "λ_D: weight of the desirable examples. The paper recommends "
                                         "λ_D·n_D / (λ_U·n_U) in [1, 4/3] (n = example counts).", ge=0)
    undesirable_weight: float = param(1.0, "λ_U: weight of the undesirable examples (see "
                                           "desirable_weight).", ge=0)
    z0: str = param("batch", "Reference point z0: 'batch' estimates KL(πθ‖πref) from mismatched pairs "
                             "(x_i, y_(i+1) mod N), each example paired once with the next one in "
                             "dataset order as TRL does (one extra sequence per completion); 'zero' uses z0 = 0 (no extra forward).",
                    choices=Z0_CHOICES)


@register(
    "kto", params=KTOParams, data="unpaired", inputs=_kto_inputs,
    paper="Ethayarajh et al. 2024, KTO: Model Alignment as Prospect Theoretic Optimization, "
          "arXiv:2402.01306, eq. 8",
    equation="desirable: λ_D·(1 − σ(β(r − z0))); undesirable: λ_U·(1 − σ(β(z0 − r))); "
             "z0 = max(0, mean_i [log πθ(y_j|x_i) − log πref(y_j|x_i)]), j = i+1 mod N, not back-propagated",
    summary="Unpaired data (a thumbs-up/down label per completion). Weight the scarcer class so "
            "λ_D·n_D/(λ_U·n_U) is in [1, 4/3].")
def kto(inputs: LossInputs, p: KTOParams) -> LossOutput:
    """KTO per example: L = λ_y − v(x, y) (eq. 8; TRL's code comment calls it eq. 7, the
    numbering differs between versions of the paper), i.e.

        desirable:    λ_D·(1 − σ(β(r − z0)))
        undesirable:  λ_U·(1 − σ(β(z0 − r))),      r = log πθ(y|x) − log πref(y|x).

    z0 ("batch"): z0 = max(0, (1/m)·Σ_i [log πθ(y_j|x_i) − log πref(y_j|x_i)]) over the m
    examples of the micro-batch, where y_j is the completion of the next example (j = i+1 mod N)
    in dataset order: the ``kl`` role, fixed per example before any batching
    (prefopt.data.roles), as TRL builds its KL dataset, so it does not depend on which examples
    share a micro-batch and a cached reference value stays valid. z0 is detached, as in the
    paper. z0 ("zero"): z0 = 0 and no mismatched pairs are scored.

    Several processes: as in the paper's code and TRL, the per-process means are averaged
    over every process (``inputs.global_mean``; micro-batches are equal-sized there) before
    clamping, so every process uses one z0.

    Weighting: the paper recommends λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3], n_D and n_U the numbers of
    desirable and undesirable examples. chosen_rewards / rejected_rewards are β·r of the
    desirable / undesirable examples (subsets, possibly of different sizes). Metric ``kl``: z0.

    Hand check (z0 = zero): β = 0.1, λ_D = λ_U = 1, r = (2, −1, 3, 0.5) labelled (desirable,
    undesirable, undesirable, desirable): 1 − σ(0.2) = 0.450166, 1 − σ(0.1) = 0.475021,
    1 − σ(−0.3) = 0.574443, 1 − σ(0.05) = 0.487503. With z0 = batch and mismatched-pair
    log-ratios (1, 2, −0.5, 0.5): z0 = 0.75, and the first example gives 1 − σ(0.125) = 0.468791.
    """
    r = inputs.policy_logps - inputs.ref_logps
    desirable = inputs.labels.to(torch.bool)
    if p.z0 == "batch":
        z0 = inputs.global_mean((inputs.policy_kl_logps - inputs.ref_kl_logps).detach().mean()).clamp(min=0)
    else:
        z0 = torch.zeros((), dtype=r.dtype, device=r.device)
    # 1 − σ(x) = σ(−x), computed without cancellation.
    gain = p.desirable_weight * torch.sigmoid(-p.beta * (r - z0))
    loss = p.undesirable_weight * torch.sigmoid(-p.beta * (z0 - r))
    losses = torch.where(desirable, gain, loss)
    rewards = p.beta * r
    return LossOutput(losses, rewards[desirable], rewards[~desirable], metrics={"kl": z0.detach()})


@dataclass
class KTOPairParams:
    beta: float = param(0.1, "β: scale of the implicit rewards r_w, r_l inside the value function.", gt=0)


@register(
    "kto_pair", params=KTOPairParams,
    paper="Ethayarajh et al. 2024, KTO, arXiv:2402.01306 (HALOs), the paired variant formerly in "
          "TRL's DPOTrainer (loss_type kto_pair, 'eqn (7) of the HALOs paper') and LLaMA-Factory",
    equation="(1 − σ(β(r_w − z_l))) + (1 − σ(β(z_w − r_l))), z_w = max(0, mean r_w), "
             "z_l = max(0, mean r_l) over the micro-batch, not back-propagated",
    summary="KTO's value function on paired data: each half's reference point is estimated from "
            "the other half. Prefer kto on unpaired data, or dpo on pairs.")
def kto_pair(inputs: LossInputs, p: KTOPairParams) -> LossOutput:
    """Paired KTO. Per pair:

        L = (1 − σ(β(r_w − z_l))) + (1 − σ(β(z_w − r_l))),
        z_w = max(0, mean_batch r_w),  z_l = max(0, mean_batch r_l)   (both detached).

    The chosen's reference point is estimated from the rejected half and vice versa.
    Differences from TRL's historical ``kto_pair``: TRL concatenated the 2B terms and averaged
    them (half of the per-pair sum used here, the same gradient direction), and did **not**
    detach z_w, z_l (so gradient flowed through the batch means). prefopt detaches them as the
    KTO paper prescribes for z0. Rewards β·r_w and β·r_l; metrics ``kto_pair/kl_chosen`` (z_w)
    and ``kto_pair/kl_rejected`` (z_l).

    Hand check: β = 0.1, r_w = (2, 1), r_l = (−1, 3): z_w = 1.5, z_l = max(0, 1) = 1.
    Pair 1: (1 − σ(0.1)) + (1 − σ(0.25)) = 0.475021 + 0.437823 = 0.912844.
    Pair 2: (1 − σ(0)) + (1 − σ(−0.15)) = 0.5 + 0.537430 = 1.037430.
    """
    r_w, r_l = log_ratios(inputs)
    z_w = r_w.detach().mean().clamp(min=0)
    z_l = r_l.detach().mean().clamp(min=0)
    losses = torch.sigmoid(-p.beta * (r_w - z_l)) + torch.sigmoid(-p.beta * (z_w - r_l))
    return LossOutput(losses, p.beta * r_w, p.beta * r_l,
                      metrics={"kto_pair/kl_chosen": z_w, "kto_pair/kl_rejected": z_l})
