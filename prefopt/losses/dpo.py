"""DPO and the losses that share its implicit reward: DPO, cDPO, reference-free DPO, IPO, soft labels
(soft_dpo, gdpo), RPO, SPIN, SDPO (multi-turn segments).

Notation (used across prefopt.losses): for a pair (x, y_w, y_l),
``r_w = log πθ(y_w|x) − log πref(y_w|x)``, ``r_l`` likewise, ``h = r_w − r_l``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefopt.losses.base import LossInputs, LossOutput, param, register
from prefopt.losses.common import log_ratios, smoothed_logistic


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
EXP_CAP = 50.0  # exponents of the α-divergence reward are capped here so the loss stays finite


def f_divergence_reward(r: torch.Tensor, divergence: str, alpha: float) -> torch.Tensor:
    """f'(u) for u = πθ/πref = e^r, up to an additive constant (which cancels in a margin).

    Wang et al. 2023 (f-DPO, arXiv:2309.16240, Table 1 / eq. 10): the implicit reward of the
    f-divergence-regularised objective is β·f'(u).
    reverse KL: f'(u) = log u + 1 → r.             forward KL: f'(u) = −1/u → −e^−r
    (the α-divergence at α = 1, written (1 − e^−r)/1). Jensen–Shannon: f'(u) = log(2u/(1+u))
    → r − log(1 + e^r) (+ log 2). α-divergence: f'(u) = (1 − u^−α)/α → (1 − e^−αr)/α.
    """
    if divergence == "reverse_kl":
        return r
    if divergence == "js":
        return r - F.softplus(r)
    a = 1.0 if divergence == "forward_kl" else alpha
    return (1 - torch.exp((-a * r).clamp(max=EXP_CAP))) / a


@dataclass
class DPOParams:
    beta: float = param(0.1, "β: inverse temperature of the implicit reward β·log(πθ/πref); "
                             "higher keeps the policy closer to the reference.", gt=0)
    label_smoothing: float = param(0.0, "ε of conservative DPO (cDPO): the assumed probability that "
                                        "a preference label is flipped. 0 is plain DPO.", ge=0, lt=0.5)
    reference_free: bool = param(False, "Ignore the reference: r = log πθ(y|x) (an implicit "
                                        "uniform reference).")
    f_divergence: str = param("reverse_kl", "Divergence regularising the policy (f-DPO): reverse_kl is "
                                            "DPO; forward_kl, js (Jensen–Shannon) or alpha "
                                            "(α-divergence, see f_alpha) change the implicit reward.",
                              choices=F_DIVERGENCES)
    f_alpha: float = param(0.5, "α of the α-divergence (f_divergence: alpha); α → 0 approaches "
                                "reverse KL, α = 1 is forward KL.", gt=0, le=1)


def _needs_ref(p) -> bool:
    return not p.reference_free


@register(
    "dpo", params=DPOParams, reference=_needs_ref, aliases=("sigmoid", "f_dpo"),
    paper="Rafailov et al. 2023, Direct Preference Optimization, arXiv:2305.18290, eq. 7; "
          "cDPO: Mitchell 2023, 'A note on DPO with noisy preferences'; f-DPO: Wang et al. 2023, "
          "arXiv:2309.16240, eq. 10",
    equation="−(1−ε)·log σ(β h) − ε·log σ(−β h); f-DPO: h = f'(u_w) − f'(u_l), u = πθ/πref",
    summary="The default. label_smoothing (cDPO) for noisy labels; reference_free when no "
            "reference model is wanted; f_divergence to trade diversity against alignment.")
def dpo(inputs: LossInputs, p: DPOParams) -> LossOutput:
    """DPO (eq. 7) with cDPO label smoothing and the f-DPO divergences.

    L = −(1−ε)·log σ(β h) − ε·log σ(−β h),  h = r_w − r_l (reverse KL, plain DPO), or
    h = f'(u_w) − f'(u_l) for the other divergences (see ``f_divergence_reward``).

    Hand check: β=0.1, log-probs chosen −10 (ref −12), rejected −15 (ref −14):
    r_w = 2, r_l = −1, h = 3, βh = 0.3, −log σ(0.3) = log(1 + e^−0.3) = 0.554355;
    with ε = 0.1: 0.9·0.554355 + 0.1·log(1 + e^0.3) = 0.9·0.554355 + 0.1·0.854355 = 0.584355.
    Jensen–Shannon, same pair: h = (2 − log(1+e²)) − (−1 − log(1+e^−1)) = −0.126928 + 1.313262
    = 1.186334, L = log(1 + e^−0.1186334) = log(1.888136) = 0.635589. α-divergence with α = 0.5:
    h = ((1 − e^−1) − (1 − e^0.5))/0.5 = (0.632121 + 0.648721)/0.5 = 2.561684,
    L = log(1 + e^−0.2561684) = log(1.774014) = 0.573243. At πθ = πref every h is 0 and L = log 2.
    """
    r_w, r_l = log_ratios(inputs, p.reference_free)
    reward_w = p.beta * f_divergence_reward(r_w, p.f_divergence, p.f_alpha)
    reward_l = p.beta * f_divergence_reward(r_l, p.f_divergence, p.f_alpha)
    return LossOutput(smoothed_logistic(reward_w - reward_l, p.label_smoothing), reward_w, reward_l)


@dataclass
class IPOParams:
    beta: float = param(0.1, "τ of IPO (Azar et al. use τ; prefopt calls it beta as TRL does): the "
                             "loss pulls h towards 1/(2τ), so smaller τ asks for a larger margin.", gt=0)


@register(
    "ipo", params=IPOParams, inputs=("chosen_lengths", "rejected_lengths"), logps="length-averaged",
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


@dataclass
class SoftDPOParams:
    beta: float = param(0.1, "β of the implicit reward.", gt=0)


def _probability_problem(p: float) -> str | None:
    return None if 0 <= p <= 1 else f"preference_prob must lie in [0, 1], got {p}"


def _check_probability(p: torch.Tensor) -> None:
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"preference_prob must lie in [0, 1], got {p[(p < 0) | (p > 1)][:3].tolist()}")


@register(
    "soft_dpo", params=SoftDPOParams, columns=("preference_prob",), aliases=("probabilistic_dpo",),
    record_check=lambda extras, p: _probability_problem(extras["preference_prob"]),
    paper="Furuta et al. 2024, Geometric-Averaged Preference Optimization for Soft Preference Labels, "
          "arXiv:2409.06691, eq. 4 (DPO's Bradley–Terry likelihood with a soft target)",
    equation="−p·log σ(β h) − (1−p)·log σ(−β h), p = preference_prob of the pair",
    summary="Per-pair soft labels (e.g. the share of annotators, or a judge's probability, "
            "preferring the chosen); p = 1 is DPO, p = 0.5 asks for no preference.")
def soft_dpo(inputs: LossInputs, p: SoftDPOParams) -> LossOutput:
    """DPO against a soft target: the binary cross-entropy between σ(βh) and p.

    L = −p·log σ(β h) − (1−p)·log σ(−β h). cDPO is the special case p = 1 − ε for all pairs.

    Hand check: β = 0.1, h = 3 (as in ``dpo``), p = 0.8: 0.8·log(1 + e^−0.3) + 0.2·log(1 + e^0.3)
    = 0.8·0.554355 + 0.2·0.854355 = 0.614355; p = 1 gives DPO's 0.554355.
    """
    prob = inputs.extras["preference_prob"]
    _check_probability(prob)
    r_w, r_l = log_ratios(inputs)
    logits = p.beta * (r_w - r_l)
    losses = -prob * F.logsigmoid(logits) - (1 - prob) * F.logsigmoid(-logits)
    return LossOutput(losses, p.beta * r_w, p.beta * r_l)


@dataclass
class GDPOParams:
    beta: float = param(0.1, "β of the implicit reward.", gt=0)


@register(
    "gdpo", params=GDPOParams, columns=("preference_prob",), aliases=("geometric_dpo",),
    record_check=lambda extras, p: _probability_problem(extras["preference_prob"]),
    paper="Furuta et al. 2024, Geometric-Averaged Preference Optimization for Soft Preference Labels "
          "(NeurIPS 2024), arXiv:2409.06691, the proposed GDPO objective: DPO on the weighted geometric averages "
          "π̄(y_1) ∝ π(y_1)^p̂·π(y_2)^(1−p̂), π̄(y_2) ∝ π(y_1)^(1−p̂)·π(y_2)^p̂",
    equation="−log σ(β·(2p̂ − 1)·h), p̂ = preference_prob of the pair",
    summary="The paper's proposed method for soft labels (soft_dpo is its baseline): the margin is "
            "scaled by 2p̂ − 1, so near-ties (p̂ → ½) barely move the policy instead of being fitted; "
            "p̂ = 1 is DPO.")
def gdpo(inputs: LossInputs, p: GDPOParams) -> LossOutput:
    """GDPO: L = −log σ(β·(2p̂ − 1)·h), h = r_w − r_l.

    Derivation: replace each likelihood (policy and reference alike) by the weighted geometric
    average of the pair's two likelihoods, weights (p̂, 1 − p̂) for the chosen and (1 − p̂, p̂) for
    the rejected; the normalisers cancel in the log-ratio margin, which becomes
    [p̂·r_w + (1−p̂)·r_l] − [(1−p̂)·r_w + p̂·r_l] = (2p̂ − 1)·h, and DPO's loss on it is GDPO. Unlike
    ``soft_dpo`` (the paper's cross-entropy baseline, whose optimum fits σ(βh) = p̂), the gradient
    scale shrinks to 0 as p̂ → ½ and the optimum keeps pushing h up for any p̂ > ½. p̂ = 1 is DPO;
    p̂ = ½ gives log 2 and no gradient; p̂ < ½ turns the pair around. Rewards β·r_w, β·r_l.

    Hand check: β = 0.1, h = 3 (chosen −10, ref −12; rejected −15, ref −14), p̂ = 0.8: 2p̂ − 1 = 0.6,
    β·0.6·3 = 0.18, L = log(1 + e^−0.18) = 0.607192; p̂ = 1: log(1 + e^−0.3) = 0.554355 (DPO);
    pair h = 2 with p̂ = 0.7: 0.1·0.4·2 = 0.08, L = log(1 + e^−0.08) = 0.653947.
    """
    prob = inputs.extras["preference_prob"]
    _check_probability(prob)
    r_w, r_l = log_ratios(inputs)
    scale = (2 * prob - 1).to(r_w.dtype)
    losses = -F.logsigmoid(p.beta * scale * (r_w - r_l))
    return LossOutput(losses, p.beta * r_w, p.beta * r_l)


@dataclass
class RPOParams:
    beta: float = param(0.1, "β of the DPO term.", gt=0)
    alpha: float = param(1.0, "Weight α of the NLL of the chosen completion (the paper uses 1).", ge=0)
    label_smoothing: float = param(0.0, "cDPO label smoothing of the DPO term.", ge=0, lt=0.5)


@register(
    "rpo", params=RPOParams, inputs=("chosen_lengths",), aliases=("dpo_nll",),
    logps="summed (+ length-normalised NLL of the chosen)",
    paper="Pang et al. 2024, Iterative Reasoning Preference Optimization, arXiv:2404.19733, eq. 1",
    equation="DPO + α·NLL(y_w), NLL(y_w) = −log πθ(y_w|x)/|y_w|",
    summary="DPO that keeps the chosen likelihood up (plain DPO can lower both); the paper's choice "
            "for reasoning. To add an NLL term to any other loss, mix it with `sft`.")
def rpo(inputs: LossInputs, p: RPOParams) -> LossOutput:
    """DPO plus the length-normalised NLL of the chosen completion.

    L = −(1−ε)·log σ(βh) − ε·log σ(−βh) + α·(−log πθ(y_w|x)/|y_w|).

    Hand check: the ``dpo`` pair (h = 3, β = 0.1: 0.554355) with log πθ(y_w) = −10 over 5
    tokens and α = 1: 0.554355 + 10/5 = 2.554355.
    """
    r_w, r_l = log_ratios(inputs)
    nll = -inputs.policy_chosen_logps / inputs.chosen_lengths.clamp(min=1)
    losses = smoothed_logistic(p.beta * (r_w - r_l), p.label_smoothing) + p.alpha * nll
    return LossOutput(losses, p.beta * r_w, p.beta * r_l, {"loss/nll": nll})


@dataclass
class SPINParams:
    beta: float = param(0.1, "λ of SPIN (the paper's regularisation parameter, β in DPO's notation).", gt=0)


@register(
    "spin", params=SPINParams,
    paper="Chen et al. 2024, Self-Play Fine-Tuning Converts Weak Language Models to Strong Language "
          "Models, arXiv:2401.01335, eq. 4.7 with the logistic loss ℓ(t) = log(1 + e^−t)",
    equation="−log σ(λ·[log πθ(y|x)/πt(y|x) − log πθ(y'|x)/πt(y'|x)])",
    summary="Self-play: chosen y = the human (SFT) response, rejected y' = the previous iterate's own "
            "generation, reference πt = the previous iterate. Needs SFT data only; the generation "
            "loop produces the pairs.")
def spin(inputs: LossInputs, p: SPINParams) -> LossOutput:
    """SPIN's objective for one iteration t (eq. 4.7, logistic ℓ).

    With y the ground-truth response, y' ~ πt(·|x) a sample of the current iterate and πt as
    the reference, the loss has DPO's form: L = log(1 + exp(−λ·(r_y − r_y'))). What makes it
    SPIN is the data and the reference, not the equation: rejected = the model's own
    generation, reference = the previous iterate.

    Hand check: the ``dpo`` pair with λ = 0.1: log(1 + e^−0.3) = 0.554355.
    """
    r_w, r_l = log_ratios(inputs)
    return LossOutput(-F.logsigmoid(p.beta * (r_w - r_l)), p.beta * r_w, p.beta * r_l)


@dataclass
class SDPOParams:
    beta: float = param(0.1, "β: inverse temperature of the implicit reward, as in DPO.", gt=0)


@register(
    "sdpo", params=SDPOParams,
    paper="Kong et al. 2025, SDPO: Segment-Level Direct Preference Optimization for Social Agents "
          "(ACL 2025), arXiv:2501.01821, §3, the loss L_SDPO on a pair of segments after a shared history",
    equation="−log σ(β·Σ_{t∈seg_w} log πθ(y_t|h_t)/πref(y_t|h_t) − β·Σ_{t∈seg_l} log πθ(y_t|h_t)/πref(y_t|h_t)), "
             "t: the segments' assistant turns only",
    summary="Multi-turn dialogue: a preference between two segments of several turns after a shared "
            "history (data format segment); only the assistant turns are scored, the other party's "
            "turns are context. Segments of equal turn counts, as the paper's derivation assumes.")
def sdpo(inputs: LossInputs, p: SDPOParams) -> LossOutput:
    """SDPO (Kong et al. 2025, §3): DPO's logistic loss on the segment-level log-ratio margin.

    For a history h and segments seg_w, seg_l (assistant turns y_t, each after its dialogue
    state h_t), L = −log σ(β·Σ_{t∈seg_w} log πθ(y_t|h_t)/πref(y_t|h_t) − β·Σ_{t∈seg_l} (same)).
    The paper derives it from turn-level occupancy measures; the partition function cancels when
    both segments have the same number of turns. Since the log-prob of a segment's assistant turns
    given their contexts is exactly the sum of the scored tokens' log-probs of the segment's
    completion under the mask the ``segment`` format builds (the other party's turns and the role
    headers are read, never scored), r_w and r_l here are the summed segment log-ratios and the
    loss is DPO's formula: L = −log σ(β (r_w − r_l)). On single-turn pairs it is DPO. The authors'
    code (AlibabaResearch/DAMO-ConvAI, SDPO/LLaMA-Factory, train/dpo/trainer.py) trains the same
    way: DPO's loss on the log-probs summed over every labelled (assistant) token of the segment.

    Hand check: the ``dpo`` pair (β = 0.1, r_w = 2, r_l = −1): log(1 + e^−0.3) = 0.554355.
    """
    r_w, r_l = log_ratios(inputs)
    return LossOutput(-F.logsigmoid(p.beta * (r_w - r_l)), p.beta * r_w, p.beta * r_l)
