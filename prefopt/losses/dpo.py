"""DPO and the losses that share its implicit reward: DPO, cDPO, reference-free DPO, IPO.

Notation (used across prefopt.losses): for a pair (x, y_w, y_l),
``r_w = log πθ(y_w|x) − log πref(y_w|x)``, ``r_l`` likewise, ``h = r_w − r_l``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefopt.losses.base import LossInputs, LossOutput, param, register


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
        r_w = r_w / inputs.chosen_lengths.clamp(min=1)
        r_l = r_l / inputs.rejected_lengths.clamp(min=1)
    return r_w, r_l


@dataclass
class DPOParams:
    beta: float = param(0.1, "β: inverse temperature of the implicit reward β·log(πθ/πref); "
                             "higher keeps the policy closer to the reference.", gt=0)
    label_smoothing: float = param(0.0, "ε of conservative DPO (cDPO): the assumed probability that "
                                        "a preference label is flipped. 0 is plain DPO.", ge=0, lt=0.5)
    reference_free: bool = param(False, "Ignore the reference: r = log πθ(y|x) (an implicit "
                                        "uniform reference).")


def _needs_ref(p) -> bool:
    return not p.reference_free


@register(
    "dpo", params=DPOParams, reference=_needs_ref, aliases=("sigmoid",),
    paper="Rafailov et al. 2023, Direct Preference Optimization, arXiv:2305.18290, eq. 7; "
          "cDPO: Mitchell 2023, 'A note on DPO with noisy preferences'",
    equation="−(1−ε)·log σ(β h) − ε·log σ(−β h)",
    summary="The default. Add label_smoothing (cDPO) for noisy labels; reference_free when no "
            "reference model is wanted.")
def dpo(inputs: LossInputs, p: DPOParams) -> LossOutput:
    """DPO (eq. 7) with cDPO label smoothing.

    L = −(1−ε)·log σ(β h) − ε·log σ(−β h),  h = r_w − r_l.

    Hand check: β=0.1, log-probs chosen −10 (ref −12), rejected −15 (ref −14):
    r_w = 2, r_l = −1, h = 3, βh = 0.3, −log σ(0.3) = log(1 + e^−0.3) = 0.554355;
    with ε = 0.1: 0.9·0.554355 + 0.1·log(1 + e^0.3) = 0.9·0.554355 + 0.1·0.854355 = 0.584355.
    At πθ = πref, h = 0 and L = log 2 for every ε.
    """
    r_w, r_l = log_ratios(inputs, p.reference_free)
    logits = p.beta * (r_w - r_l)
    eps = p.label_smoothing
    losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return LossOutput(losses, p.beta * r_w, p.beta * r_l)


@dataclass
class IPOParams:
    beta: float = param(0.1, "τ of IPO (Azar et al. use τ; prefopt calls it beta as TRL does): the "
                             "loss pulls h towards 1/(2τ), so smaller τ asks for a larger margin.", gt=0)


@register(
    "ipo", params=IPOParams, inputs=("chosen_lengths", "rejected_lengths"),
    paper="Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human "
          "Preferences, arXiv:2310.12036, eq. 17",
    equation="(h̄ − 1/(2τ))², h̄ from length-averaged log-probs",
    summary="Regresses the log-ratio margin to a fixed target instead of pushing it to infinity; "
            "robust when preferences are near-deterministic and DPO overfits.")
def ipo(inputs: LossInputs, p: IPOParams) -> LossOutput:
    """IPO (eq. 17): L = (h̄ − 1/(2τ))², with τ = beta.

    The log-probs are **averaged over completion tokens** before forming h̄, as the IPO
    authors confirmed for TRL's implementation (summed log-probs make the fixed target
    1/(2τ) depend on the response length).

    Hand check: τ = 0.5 (target 1); chosen −10 over 5 tokens (ref −12), rejected −15 over
    3 tokens (ref −14): r̄_w = 2/5 = 0.4, r̄_l = −1/3, h̄ = 0.733333, L = (0.733333 − 1)² = 0.071111.
    """
    r_w, r_l = log_ratios(inputs, average=True)
    losses = (r_w - r_l - 1 / (2 * p.beta)) ** 2
    return LossOutput(losses, p.beta * r_w, p.beta * r_l)
