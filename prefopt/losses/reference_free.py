"""Losses without a reference model: SimPO, ORPO, CPO, SLiC-HF.

All four read the policy's log-probs only (``reference=False``), so a run with them needs
no second model. Notation as in ``prefopt.losses.dpo``; in addition, for a completion y,

    NLL(y) = −log πθ(y|x) / |y|      (per-example, length-normalised negative log-likelihood)

is what the ``loss/nll`` metric reports for every loss here that has an NLL term.
Sequence log-probs arrive as **sums** over completion tokens; the losses that work on
length-averaged log-probs (SimPO, ORPO) divide by the completion lengths themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefopt.losses.base import LossInputs, LossOutput, param, register
from prefopt.losses.common import average_logps, log_ratios, smoothed_logistic

Tensor = torch.Tensor

# ORPO's log(1 − p) is evaluated at log p ≤ −ODDS_EPS: at p = 1 the odds are infinite.
ODDS_EPS = 1e-6


def log1m_exp(logp: Tensor, eps: float = ODDS_EPS) -> Tensor:
    """log(1 − e^logp) for logp ≤ 0, computed as log(−expm1(logp)).

    ``expm1`` keeps the relative precision of 1 − p when p is close to 1, and for p → 0
    (logp → −∞) the result tends to 0 without overflow. logp is clamped to ≤ −eps so that
    p = 1 (or a log-prob rounded above 0) gives a large but finite value and gradient.
    """
    return torch.log(-torch.expm1(logp.clamp(max=-eps)))


# ---------------------------------------------------------------------------------------- SimPO
@dataclass
class SimPOParams:
    beta: float = param(2.0, "β: scale of the length-normalised reward β·log πθ(y|x)/|y|. SimPO needs "
                             "a much larger β than DPO; the paper uses 2.0–2.5 (sometimes 10).", gt=0)
    gamma: float = param(1.0, "γ: target reward margin. The authors recommend tuning γ/β, starting "
                              "from γ/β = 0.5 (grid 0–1); the default is 0.5·β for β = 2.", ge=0)
    label_smoothing: float = param(0.0, "ε: conservative (cDPO-style) label smoothing, as in TRL's "
                                        "CPO trainer with loss_type simpo. 0 is the paper's loss.",
                                   ge=0, lt=0.5)


@register(
    "simpo", params=SimPOParams, reference=False, inputs=("chosen_lengths", "rejected_lengths"),
    logps="length-averaged",
    paper="Meng, Xia & Chen 2024, SimPO: Simple Preference Optimization with a Reference-Free "
          "Reward, arXiv:2405.14734, eq. 6",
    equation="−log σ(β/|y_w|·log πθ(y_w|x) − β/|y_l|·log πθ(y_l|x) − γ)",
    summary="Reference-free DPO on length-averaged log-probs with a target margin γ: no reference "
            "model, and the reward matches the average log-likelihood that generation optimises.")
def simpo(inputs: LossInputs, p: SimPOParams) -> LossOutput:
    """SimPO (eq. 6) with optional cDPO label smoothing ε.

    z = β·log πθ(y_w|x)/|y_w| − β·log πθ(y_l|x)/|y_l| − γ,
    L = −(1−ε)·log σ(z) − ε·log σ(−z).

    Rewards are SimPO's implicit rewards β·log πθ(y|x)/|y| (eq. 4).

    Default γ: the SimPO README tells users to tune γ/β and start from γ/β = 0.5; with the
    default β = 2 that is γ = 1.0 (the released models used γ/β between 0.1 and 0.8).

    Hand check: β = 2, γ = 1, chosen −10 over 5 tokens (average −2), rejected −15 over
    3 tokens (average −5): z = 2·(−2) − 2·(−5) − 1 = 5, L = log(1 + e^−5) = 0.006715;
    rewards −4 and −10. Chosen −8 over 4 tokens (−2), rejected −3 over 1 token (−3):
    z = −4 + 6 − 1 = 1, L = log(1 + e^−1) = 0.313262.
    """
    avg_w = average_logps(inputs.policy_chosen_logps, inputs.chosen_lengths)
    avg_l = average_logps(inputs.policy_rejected_logps, inputs.rejected_lengths)
    reward_w, reward_l = p.beta * avg_w, p.beta * avg_l
    losses = smoothed_logistic(reward_w - reward_l - p.gamma, p.label_smoothing)
    return LossOutput(losses, reward_w, reward_l)


# ----------------------------------------------------------------------------------------- ORPO
@dataclass
class ORPOParams:
    beta: float = param(0.1, "λ of the paper (TRL calls it beta): weight of the odds-ratio term "
                             "relative to the NLL of the chosen completion.", gt=0)


@register(
    "orpo", params=ORPOParams, reference=False, inputs=("chosen_lengths", "rejected_lengths"),
    logps="length-averaged",
    paper="Hong, Lee & Thorne 2024, ORPO: Monolithic Preference Optimization without Reference "
          "Model, arXiv:2403.07691, eqs. 6–7",
    equation="NLL(y_w) − λ·log σ(log odds(y_w) − log odds(y_l)), odds(y) = p/(1−p), "
             "log p = log πθ(y|x)/|y|",
    summary="SFT and preference alignment in one stage, without a reference model: the NLL of the "
            "chosen plus a mild odds-ratio penalty on the rejected. Start from the base model.")
def orpo(inputs: LossInputs, p: ORPOParams) -> LossOutput:
    """ORPO: L = L_SFT + λ·L_OR (eq. 6), L_OR = −log σ(log(odds(y_w)/odds(y_l))) (eq. 7).

    p is the **length-averaged** likelihood, log p = log πθ(y|x)/|y| (as the paper and its
    official code define P_θ(y|x)), and log odds(y) = log p − log(1 − p), with log(1 − p)
    computed stably by ``log1m_exp`` (finite at p → 1 and at p → 0).
    L_SFT = NLL(y_w) = −log πθ(y_w|x)/|y_w| per example, over the **completion tokens only**.
    This departs on purpose from TRL 1.16 and the authors' default: TRL's ORPOTrainer computes the
    chosen NLL as the cross-entropy over every attended token of prompt + chosen ("computed over
    the full prompt and response"; its labels are the input ids wherever the attention mask is
    1), and the authors' code (xfactlab/orpo) does the same unless ``disable_prompt_loss`` is set
    (off by default); both average it over all those tokens of the batch. prefopt keeps the
    prompt as context only (as every prefopt loss does, and as the paper's eq. 6 writes
    L_SFT over y_w), so a long prompt does not dilute the chosen NLL nor train the model to write
    prompts; the odds-ratio term uses completion tokens in all three.

    Rewards are β·(average log-prob), as TRL reports them. Metrics: ``loss/nll`` (NLL(y_w))
    and ``orpo/log_odds_ratio`` = log odds(y_w) − log odds(y_l) per example (TRL logs this
    as ``log_odds_chosen``; its ``log_odds_ratio`` is log σ of it).

    Hand check: λ = 0.1, chosen average log-prob log 0.5 (odds 1), rejected log 0.25 (odds 1/3):
    log-odds ratio log 3, L_OR = −log σ(log 3) = −log(3/4) = 0.287682, NLL = log 2 = 0.693147,
    L = 0.693147 + 0.1·0.287682 = 0.721915. Chosen log 0.8 (odds 4), rejected log 0.5 (odds 1):
    L_OR = −log(4/5) = 0.223144, NLL = −log 0.8 = 0.223144, L = 0.245458.
    """
    avg_w = average_logps(inputs.policy_chosen_logps, inputs.chosen_lengths)
    avg_l = average_logps(inputs.policy_rejected_logps, inputs.rejected_lengths)
    log_odds = (avg_w - log1m_exp(avg_w)) - (avg_l - log1m_exp(avg_l))
    nll = -avg_w
    losses = nll - p.beta * F.logsigmoid(log_odds)
    return LossOutput(losses, p.beta * avg_w, p.beta * avg_l,
                      metrics={"loss/nll": nll.detach(), "orpo/log_odds_ratio": log_odds.detach()})


# ------------------------------------------------------------------------------------------ CPO
@dataclass
class CPOParams:
    beta: float = param(0.1, "β of the reference-free preference term.", gt=0)
    alpha: float = param(1.0, "α: weight of the NLL (behaviour cloning) term on the chosen; the "
                              "paper's loss is α = 1 (TRL's cpo_alpha).", ge=0)
    label_smoothing: float = param(0.0, "ε: cDPO label smoothing of the preference term.", ge=0, lt=0.5)


@register(
    "cpo", params=CPOParams, reference=False, inputs=("chosen_lengths",),
    logps="summed (+ length-normalised NLL of the chosen)",
    paper="Xu et al. 2024, Contrastive Preference Optimization: Pushing the Boundaries of LLM "
          "Performance in Machine Translation, arXiv:2401.08417, eqs. 3–5",
    equation="−(1−ε)·log σ(β(log πθ(y_w|x) − log πθ(y_l|x))) − ε·log σ(−β(…)) + α·NLL(y_w)",
    summary="Reference-free DPO on summed log-probs plus an NLL term on the chosen: memory of "
            "SFT, contrast of DPO. Written for translation, used for chat too.")
def cpo(inputs: LossInputs, p: CPOParams) -> LossOutput:
    """CPO: L = L_prefer (eq. 3, DPO with πref dropped) + α·L_NLL (eq. 4), combined in eq. 5.

    z = β·(log πθ(y_w|x) − log πθ(y_l|x)) on **summed** log-probs,
    L = −(1−ε)·log σ(z) − ε·log σ(−z) + α·NLL(y_w),  NLL(y_w) = −log πθ(y_w|x)/|y_w|.

    The NLL is length-normalised per example (prefopt's convention; the paper writes
    −log πθ(y_w|x), TRL averages the cross-entropy over the batch's chosen tokens).
    Rewards β·log πθ(y|x), as TRL. Metric ``loss/nll``.

    Hand check: β = 0.1, α = 1, chosen −10 over 5 tokens, rejected −15: z = 0.5,
    −log σ(0.5) = log(1 + e^−0.5) = 0.474077, NLL = 2, L = 2.474077. Chosen −6 over
    2 tokens, rejected −4: z = −0.2, log(1 + e^0.2) = 0.798139, NLL = 3, L = 3.798139.
    """
    r_w, r_l = log_ratios(inputs, reference_free=True)
    nll = -average_logps(inputs.policy_chosen_logps, inputs.chosen_lengths)
    losses = smoothed_logistic(p.beta * (r_w - r_l), p.label_smoothing) + p.alpha * nll
    return LossOutput(losses, p.beta * r_w, p.beta * r_l, metrics={"loss/nll": nll.detach()})


# ----------------------------------------------------------------------------------------- SLiC
@dataclass
class SLiCParams:
    delta: float = param(1.0, "δ: margin of the rank calibration (hinge) loss, in summed log-prob "
                              "units: the chosen must beat the rejected by δ nats. prefopt's default; "
                              "the paper tunes δ per task.", ge=0)
    reg_weight: float = param(0.5, "λ: weight of the cross-entropy regulariser −log πθ(y_ref|x) "
                                   "(summed over tokens, as in the paper). prefopt's default; the paper "
                                   "tunes λ per task.", ge=0)


@register(
    "slic", params=SLiCParams, reference=False, inputs=("policy_ref_completion_logps",),
    paper="Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with Human Feedback, "
          "arXiv:2305.10425, §2 (rank calibration loss with cross-entropy regularisation)",
    equation="max(0, δ − log πθ(y_w|x) + log πθ(y_l|x)) − λ·log πθ(y_ref|x)",
    summary="Hinge on the sequence log-likelihood margin plus a likelihood anchor on y_ref (the "
            "ref_completion column, a sample of the SFT model, or the chosen when absent).")
def slic(inputs: LossInputs, p: SLiCParams) -> LossOutput:
    """SLiC-HF: L = max(0, δ − log πθ(y_w|x) + log πθ(y_l|x)) − λ·log πθ(y_ref|x).

    Both terms use **summed** sequence log-probs, as in the paper (its regulariser is the
    sequence cross-entropy of y_ref, standing in for a KL to the SFT model; it is not
    length-normalised), so δ and λ keep the paper's meaning. y_ref is the ``ref_completion``
    column when the data has one, otherwise the chosen completion (the paper's "SFT target"
    option); the objective provides it as ``policy_ref_completion_logps``, and a direct call
    without it falls back to the chosen. No reference model is used. Rewards β-free:
    log πθ(y|x) of chosen and rejected (the quantities the hinge compares).

    Metrics: ``slic/reg`` = −log πθ(y_ref|x) (the unweighted regulariser) and, when the
    lengths are known, ``loss/nll`` = −log πθ(y_ref|x)/|y_ref|.

    Hand check: δ = 1, λ = 0.5. Chosen −10, rejected −15, y_ref −12: hinge max(0, 1 − 5) = 0,
    regulariser 0.5·12 = 6, L = 6. Chosen −6, rejected −5.5, y_ref −4: hinge 1 + 0.5 = 1.5,
    regulariser 2, L = 3.5. Without y_ref (the chosen stands in): L = 0 + 5 = 5 and
    1.5 + 3 = 4.5.
    """
    pc, pr = inputs.policy_chosen_logps, inputs.policy_rejected_logps
    if inputs.policy_ref_completion_logps is not None:
        target, target_lengths = inputs.policy_ref_completion_logps, inputs.ref_completion_lengths
    else:
        target, target_lengths = pc, inputs.chosen_lengths
    hinge = torch.relu(p.delta - pc + pr)
    losses = hinge - p.reg_weight * target
    metrics = {"slic/reg": -target.detach()}
    if target_lengths is not None:
        metrics["loss/nll"] = -average_logps(target.detach(), target_lengths)
    return LossOutput(losses, pc, pr, metrics=metrics)
