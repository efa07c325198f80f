"""Losses without a reference model: SimPO, AlphaPO, ORPO, CPO (sigmoid, hinge, IPO), TPO, TPO-L,
SLiC-HF.

All of them read the policy's log-probs only (``reference=False``), so a run with them needs
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
CPO_LOSSES = ("sigmoid", "hinge", "ipo")


def preference_term(logits: Tensor, beta: float, loss: str, eps: float) -> Tensor:
    """The preference term of CPO and TPO on a log-likelihood margin ``logits`` (B,).

    sigmoid: −(1−ε)·log σ(β·m) − ε·log σ(−β·m) (DPO's form); hinge: max(0, 1 − β·m) (SLiC's
    calibration hinge); ipo: (m − 1/(2β))² (IPO's eq. 17, β = τ). As in TRL's CPO and TPO trainers.
    """
    if loss == "hinge":
        return torch.relu(1 - beta * logits)
    if loss == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    return smoothed_logistic(beta * logits, eps)


def _no_smoothing_unless_sigmoid(p) -> None:
    if p.loss != "sigmoid" and p.label_smoothing:
        raise ValueError(f"label_smoothing={p.label_smoothing} applies to loss: sigmoid only; the {p.loss} "
                         f"term has no label to smooth (TRL warns and ignores it)")


@dataclass
class CPOParams:
    beta: float = param(0.1, "β of the reference-free preference term (τ of IPO's target 1/(2τ) with "
                             "loss: ipo).", gt=0)
    alpha: float = param(1.0, "α: weight of the NLL (behaviour cloning) term on the chosen; the "
                              "paper's loss is α = 1 (TRL's cpo_alpha).", ge=0)
    label_smoothing: float = param(0.0, "ε: cDPO label smoothing of the preference term (loss: sigmoid "
                                        "only).", ge=0, lt=0.5)
    loss: str = param("sigmoid", "The preference term, as TRL's CPOConfig loss_type: sigmoid (the paper's, "
                                 "on summed log-probs), hinge (max(0, 1 − β·m), summed) or ipo "
                                 "((m − 1/(2β))², length-averaged log-probs).", choices=CPO_LOSSES)

    def validate(self) -> None:
        _no_smoothing_unless_sigmoid(self)


def _cpo_inputs(p: CPOParams) -> tuple[str, ...]:
    return ("chosen_lengths", "rejected_lengths") if p.loss == "ipo" else ("chosen_lengths",)


@register(
    "cpo", params=CPOParams, reference=False, inputs=_cpo_inputs,
    logps="summed (length-averaged with loss: ipo; + length-normalised NLL of the chosen)",
    paper="Xu et al. 2024, Contrastive Preference Optimization: Pushing the Boundaries of LLM "
          "Performance in Machine Translation, arXiv:2401.08417, eq. 3 (L(πθ; U)) plus the NLL term of eq. 5; "
          "hinge and ipo terms as TRL's CPOConfig loss_type (SLiC, arXiv:2305.10425; IPO, arXiv:2310.12036, "
          "eq. 17)",
    equation="ℓ(m) + α·NLL(y_w), m = log πθ(y_w|x) − log πθ(y_l|x); ℓ = −(1−ε)·log σ(βm) − ε·log σ(−βm) "
             "(sigmoid), max(0, 1 − βm) (hinge), (m̄ − 1/(2β))² (ipo, m̄ length-averaged)",
    summary="Reference-free DPO on summed log-probs plus an NLL term on the chosen: memory of "
            "SFT, contrast of DPO. Written for translation, used for chat too. loss: hinge or ipo "
            "swap the logistic term for TRL's alternatives.")
def cpo(inputs: LossInputs, p: CPOParams) -> LossOutput:
    """CPO: L = L_prefer + α·L_NLL: eq. 3's L(πθ; U) (DPO with a uniform πref, which drops out) plus
    the NLL of the chosen that eq. 5 adds (the paper's eq. 4 is the behaviour-cloning constraint
    that eq. 5 turns into that NLL term). TRL's CPOTrainer.cpo_loss says of its sigmoid term "this
    reduces to Equation 3 from the CPO paper".

    m = log πθ(y_w|x) − log πθ(y_l|x) on **summed** log-probs, and the preference term (``loss``):
    sigmoid (the paper's): −(1−ε)·log σ(βm) − ε·log σ(−βm);
    hinge: max(0, 1 − βm) (TRL's loss_type hinge, SLiC's calibration loss);
    ipo: (m̄ − 1/(2β))² with m̄ on **length-averaged** log-probs (TRL's loss_type ipo averages the
    log-probs for it, as IPO does), then L = term + α·NLL(y_w), NLL(y_w) = −log πθ(y_w|x)/|y_w|.

    The NLL is length-normalised per example (prefopt's convention; the paper writes
    −log πθ(y_w|x), TRL averages the cross-entropy over the batch's chosen tokens).
    Rewards β·log πθ(y|x) (β·average log-prob with ipo), as TRL. Metric ``loss/nll``.

    Hand check: β = 0.1, α = 1, chosen −10 over 5 tokens, rejected −15 over 3: sigmoid: m = 5,
    βm = 0.5, −log σ(0.5) = log(1 + e^−0.5) = 0.474077, NLL = 2, L = 2.474077. Chosen −6 over
    2 tokens, rejected −4 over 1: βm = −0.2, log(1 + e^0.2) = 0.798139, NLL = 3, L = 3.798139.
    hinge: 1 − 0.5 = 0.5 → L = 2.5; 1 + 0.2 = 1.2 → L = 4.2. ipo (target 1/(2β) = 5):
    m̄ = −10/5 + 15/3 = 3, (3 − 5)² = 4 → L = 6; m̄ = −6/2 + 4/1 = 1, (1 − 5)² = 16 → L = 19.
    """
    average = p.loss == "ipo"
    r_w, r_l = log_ratios(inputs, reference_free=True, average=average)
    nll = -average_logps(inputs.policy_chosen_logps, inputs.chosen_lengths)
    losses = preference_term(r_w - r_l, p.beta, p.loss, p.label_smoothing) + p.alpha * nll
    return LossOutput(losses, p.beta * r_w, p.beta * r_l, metrics={"loss/nll": nll.detach()})


# --------------------------------------------------------------------------------------- AlphaPO
ALPHA_EXP_CAP = 50.0  # the exponent −α·(average log-prob) is capped here so the reward stays finite


def alpha_reward(avg_logps: Tensor, alpha: float) -> Tensor:
    """AlphaPO's reward shape without β: (1 − p̄^(−α))/α, p̄ = e^(average log-prob); log p̄ at α = 0.

    p̄^(−α) = e^(−α·ā) is computed with its exponent capped at ALPHA_EXP_CAP (a per-token
    log-prob below −50/α): past it the reward is constant and its gradient zero, instead of inf.
    """
    if alpha == 0:
        return avg_logps
    return -torch.expm1((-alpha * avg_logps).clamp(max=ALPHA_EXP_CAP)) / alpha  # expm1: exact as α → 0


@dataclass
class AlphaPOParams:
    beta: float = param(2.0, "β: scale of the reward, as SimPO's (the reward tends to β·average log-prob "
                             "as α → 0).", gt=0)
    gamma: float = param(1.0, "γ: target reward margin, as SimPO's.", ge=0)
    alpha: float = param(0.25, "α: the reward's shape (TRL's CPOConfig alpha). 0 is SimPO's log reward; "
                               "α > 0 bounds the reward above by β/α and flattens it for likely "
                               "completions, which the paper shows curbs the fall of the chosen "
                               "likelihood; the paper tunes α per model, small positive values doing best. "
                               "prefopt's default.")
    label_smoothing: float = param(0.0, "ε: conservative (cDPO-style) label smoothing, as in TRL's CPO trainer "
                                        "(loss_type simpo/alphapo). 0 is the paper's loss.", ge=0, lt=0.5)


@register(
    "alphapo", params=AlphaPOParams, reference=False, inputs=("chosen_lengths", "rejected_lengths"),
    logps="length-averaged",
    paper="Gupta et al. 2025, AlphaPO: Reward Shape Matters for LLM Alignment, arXiv:2501.03884 (ICML 2025), "
          "§3: the α-reward r_α = (β/α)·(1 − πθ(y|x)^(−α/|y|)) in SimPO's objective; TRL's CPOConfig "
          "alpha with loss_type alphapo",
    equation="−log σ(r_α(y_w) − r_α(y_l) − γ), r_α(y) = β·(1 − πθ(y|x)^(−α/|y|))/α; α → 0 is SimPO",
    summary="SimPO with a reward shape α: α > 0 keeps the chosen likelihood from collapsing (less "
            "likelihood displacement, less over-optimisation). No reference model.")
def alphapo(inputs: LossInputs, p: AlphaPOParams) -> LossOutput:
    """AlphaPO: SimPO's objective on the α-reward r_α(y) = β·(1 − p̄(y)^(−α))/α, p̄ = πθ(y|x)^(1/|y|).

    z = r_α(y_w) − r_α(y_l) − γ,  L = −(1−ε)·log σ(z) − ε·log σ(−z).

    p̄ is the geometric mean token probability, so p̄^(−α) = e^(−α·ā) with ā = log πθ(y|x)/|y|,
    exactly TRL's CPO trainer (loss_type alphapo: SimPO's length-averaged log-probs, the
    transform (1 − p^(−α))/α, then β·(…) − γ, and cpo_alpha = 0). As α → 0, (1 − e^(−αā))/α → ā:
    SimPO's reward β·ā; α = 0 is computed as SimPO exactly. Rewards are r_α. The paper is
    arXiv:2501.03884 (the id TRL 1.16's CPOConfig links); tests/test_paper_equations.py runs TRL's
    CPOTrainer.cpo_loss on the same log-probs and gets the same losses and rewards.

    Hand check: β = 1, γ = 0.5, α = 0.5. Pair 1: chosen −4 over 4 tokens (ā = −1), rejected −6
    over 3 (ā = −2): r_w = (1 − e^0.5)/0.5 = 2·(1 − 1.648721) = −1.297443, r_l = 2·(1 − e^1) =
    −3.436564, z = 2.139121 − 0.5 = 1.639121, L = log(1 + e^−1.639121) = 0.177435 (SimPO, α = 0:
    z = −1 + 2 − 0.5 = 0.5, L = 0.474077). Pair 2: chosen −3 over 1 (ā = −3), rejected −2 over 2
    (ā = −1): r_w = 2·(1 − e^1.5) = −6.963378, r_l = −1.297443, z = −6.165936, L = 6.168033.
    """
    avg_w = average_logps(inputs.policy_chosen_logps, inputs.chosen_lengths)
    avg_l = average_logps(inputs.policy_rejected_logps, inputs.rejected_lengths)
    reward_w, reward_l = p.beta * alpha_reward(avg_w, p.alpha), p.beta * alpha_reward(avg_l, p.alpha)
    losses = smoothed_logistic(reward_w - reward_l - p.gamma, p.label_smoothing)
    return LossOutput(losses, reward_w, reward_l)


# ------------------------------------------------------------------------------------ TPO, TPO-L
_TPO_PAPER = ("Saeidi et al. 2024, Triple Preference Optimization: Achieving Better Alignment using a Single "
              "Step Optimization, arXiv:2405.16681, ")
_TPO_COLUMNS = ("ref_completion",)
_TPO_INPUTS = ("chosen_lengths", "rejected_lengths", "policy_ref_completion_logps", "ref_completion_lengths")


def _gold_nll(inputs: LossInputs) -> Tensor:
    """−log πθ(y_gold|x)/|y_gold|: the NLL of the gold response (the ref_completion column)."""
    return -average_logps(inputs.policy_ref_completion_logps, inputs.ref_completion_lengths)


@dataclass
class TPOParams:
    beta: float = param(0.01, "β of the preference term on summed log-probs (τ of IPO's target with loss: "
                              "ipo); TRL's TPOConfig default.", gt=0)
    alpha: float = param(1.0, "α: weight of the NLL of the gold response (TRL's tpo_alpha). 0 leaves the "
                              "preference term alone.", ge=0)
    label_smoothing: float = param(0.0, "ε: cDPO label smoothing of the preference term (loss: sigmoid only).",
                                   ge=0, lt=0.5)
    loss: str = param("sigmoid", "The preference term, as TRL's TPOConfig loss_type: sigmoid (the paper's), "
                                 "hinge, or ipo (length-averaged). TPO-L is the loss tpo_l.", choices=CPO_LOSSES)

    def validate(self) -> None:
        _no_smoothing_unless_sigmoid(self)


@register(
    "tpo", params=TPOParams, reference=False, inputs=_TPO_INPUTS, columns=_TPO_COLUMNS,
    logps="summed (length-averaged with loss: ipo; + length-normalised NLL of the gold)",
    paper=_TPO_PAPER + "the TPO objective (a reference-free preference term between chosen and rejected "
                       "plus the SFT loss on the gold response); hinge/ipo as TRL's TPOConfig loss_type",
    equation="−log σ(β·(log πθ(y_w|x) − log πθ(y_l|x))) + α·NLL(y_gold), NLL(y) = −log πθ(y|x)/|y|",
    summary="Preference triples (a gold response, a chosen, a rejected; data: the ref_completion column "
            "holds the gold, TRL's `reference`): SFT on the gold and preference in one stage, no reference "
            "model.")
def tpo(inputs: LossInputs, p: TPOParams) -> LossOutput:
    """TPO: L = ℓ(m) + α·NLL(y_gold), m = log πθ(y_w|x) − log πθ(y_l|x) (summed log-probs).

    ℓ is CPO's preference term (``preference_term``): sigmoid (the paper's), hinge, or ipo on
    length-averaged log-probs, as TRL's TPOTrainer and the authors' code (sahsaeedi/TPO,
    utils/tpo_trainer.py, tpo_loss on summed log-probs, plus tpo_alpha times the gold's NLL). The
    "reference" of TPO is not a reference model but the gold response y_gold, whose likelihood the
    NLL term raises: in prefopt it is the ``ref_completion`` column, which TPO **requires** (a
    record without it is a bad record; TRL's triple data names it `reference`: map it with
    data.columns: {ref_completion: reference}).
    NLL(y_gold) = −log πθ(y_gold|x)/|y_gold| per example (TRL averages the cross-entropy over the
    batch's gold tokens). With y_gold = y_w, TPO is CPO. Rewards β·log πθ(y|x), as TRL. Metric
    ``loss/nll`` (of the gold).

    Hand check: β = 0.1, α = 1: chosen −10, rejected −15, gold −12 over 4 tokens: βm = 0.5,
    log(1 + e^−0.5) = 0.474077, NLL = 3, L = 3.474077. hinge: 1 − 0.5 = 0.5, L = 3.5.
    """
    r_w, r_l = log_ratios(inputs, reference_free=True, average=p.loss == "ipo")
    nll = _gold_nll(inputs)
    losses = preference_term(r_w - r_l, p.beta, p.loss, p.label_smoothing) + p.alpha * nll
    return LossOutput(losses, p.beta * r_w, p.beta * r_l, metrics={"loss/nll": nll.detach()})


@dataclass
class TPOLParams:
    beta: float = param(2.0, "β: scale of the length-normalised reward β·log πθ(y|x)/|y|, as SimPO's (TPO-L "
                             "is SimPO's term plus the gold NLL). prefopt's default: TRL's TPOConfig shares "
                             "one beta (0.01) with the summed-log-prob TPO.", gt=0)
    gamma: float = param(0.5, "γ: target reward margin (TRL's tpo_l_gamma).", ge=0)
    alpha: float = param(1.0, "α: weight of the NLL of the gold response (TRL's tpo_alpha).", ge=0)
    label_smoothing: float = param(0.0, "ε: cDPO label smoothing of the preference term.", ge=0, lt=0.5)


@register(
    "tpo_l", params=TPOLParams, reference=False, inputs=_TPO_INPUTS, columns=_TPO_COLUMNS,
    logps="length-averaged (+ length-normalised NLL of the gold)",
    paper=_TPO_PAPER + "TPO-L, the length-controlled TPO (SimPO's length-normalised reward and margin γ); "
                       "TRL's TPOConfig loss_type tpo-l",
    equation="−log σ(β/|y_w|·log πθ(y_w|x) − β/|y_l|·log πθ(y_l|x) − γ) + α·NLL(y_gold)",
    summary="TPO with length-normalised rewards and a target margin γ: the preference term is SimPO's, "
            "plus SFT on the gold response (the ref_completion column). No reference model.")
def tpo_l(inputs: LossInputs, p: TPOLParams) -> LossOutput:
    """TPO-L: z = β·ā_w − β·ā_l − γ, ā = log πθ(y|x)/|y|; L = −(1−ε)·log σ(z) − ε·log σ(−z) + α·NLL(y_gold).

    TRL's tpo-l, like the authors' code (tpo_loss, loss_type tpo-l, on length-averaged log-probs),
    writes it as β·(ā_w − ā_l − γ/β): the same z. The gold response is the required
    ``ref_completion`` column, as in ``tpo``. With α = 0 TPO-L is SimPO. Rewards β·ā, as TRL.

    Hand check: β = 2, γ = 1, α = 1: chosen −10 over 5 tokens (ā = −2), rejected −15 over 3
    (ā = −5), gold −12 over 4: z = −4 + 10 − 1 = 5, log(1 + e^−5) = 0.006715, NLL = 3,
    L = 3.006715.
    """
    avg_w = average_logps(inputs.policy_chosen_logps, inputs.chosen_lengths)
    avg_l = average_logps(inputs.policy_rejected_logps, inputs.rejected_lengths)
    reward_w, reward_l = p.beta * avg_w, p.beta * avg_l
    nll = _gold_nll(inputs)
    losses = smoothed_logistic(reward_w - reward_l - p.gamma, p.label_smoothing) + p.alpha * nll
    return LossOutput(losses, reward_w, reward_l, metrics={"loss/nll": nll.detach()})


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
