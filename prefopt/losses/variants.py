"""The other reference-based paired losses: DPO's implicit reward r = log πθ/πref, other links.

hinge (RSO), robust (rDPO), dpop (DPO-Positive), odpo (DPO with an offset), sppo_hard, nca_pair,
apo_zero / apo_down, exo_pair, bco_pair (stateful), aot / aot_unpaired (batch-level) and
discopop; sigmoid_norm is DPO on length-normalised log-ratios.

Notation (as in ``prefopt.losses.dpo``): for a pair (x, y_w, y_l),
``r_w = log πθ(y_w|x) − log πref(y_w|x)``, ``r_l`` likewise, ``h = r_w − r_l``; log-probs are
sums over completion tokens. ``sp(x) = log(1 + eˣ) = −log σ(−x)`` (softplus) in the hand
checks. Unless a paper defines another implicit reward, the reported rewards are β·r_w, β·r_l.

Every loss here returns finite losses and gradients for log-probs in [−1e4, −1e-4]: softplus
and logsigmoid instead of log(sigmoid), and DiscoPOP's exponential term computed in log space.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefopt.losses.base import LossInputs, LossOutput, param, register
from prefopt.losses.common import log_ratios, smoothed_logistic

Tensor = torch.Tensor


def _rewards(p, r_w: Tensor, r_l: Tensor) -> tuple[Tensor, Tensor]:
    return p.beta * r_w, p.beta * r_l


# ---------------------------------------------------------------------------------- hinge (RSO)
@dataclass
class HingeParams:
    beta: float = param(0.1, "γ of RSO's hinge-norm loss: the loss is zero once β·h ≥ 1, i.e. once the "
                             "log-ratio margin h exceeds 1/β (10 nats at 0.1).", gt=0)


@register(
    "hinge", params=HingeParams,
    paper="Liu et al. 2024, Statistical Rejection Sampling Improves Preference Optimization (RSO), "
          "arXiv:2309.06657, §3 'hinge-norm' loss (SLiC's hinge, Zhao et al. 2023, on the "
          "reference-normalised likelihood)",
    equation="max(0, 1 − β h)",
    summary="SLiC's calibration hinge on DPO's log-ratio margin: pairs already separated by 1/β "
            "stop contributing (no gradient), unlike the logistic loss.")
def hinge(inputs: LossInputs, p: HingeParams) -> LossOutput:
    """RSO hinge-norm: L = max(0, 1 − β·h), h = r_w − r_l.

    Hand check (β = 0.1): pair A, chosen −10 (ref −12), rejected −15 (ref −14): r_w = 2,
    r_l = −1, h = 3, L = 1 − 0.3 = 0.7; pair B, chosen −8 (ref −7), rejected −9 (ref −6):
    r_w = −1, r_l = −3, h = 2, L = 1 − 0.2 = 0.8. With β = 0.5 both margins exceed 1/β = 2
    or equal it (h = 3: 1 − 1.5 < 0; h = 2: 1 − 1 = 0): L = 0, and so is the gradient.
    At πθ = πref, L = 1.
    """
    r_w, r_l = log_ratios(inputs)
    losses = torch.relu(1 - p.beta * (r_w - r_l))
    return LossOutput(losses, *_rewards(p, r_w, r_l))


# ---------------------------------------------------------------------------------- robust (rDPO)
@dataclass
class RobustParams:
    beta: float = param(0.1, "β of DPO's implicit reward.", gt=0)
    label_smoothing: float = param(0.1, "ε: the assumed probability that a preference label was flipped. "
                                        "0 is plain DPO; the loss is unbiased for the clean loss "
                                        "when ε is the true flip rate.", ge=0, lt=0.5)


@register(
    "robust", params=RobustParams, aliases=("rdpo",),
    paper="Chowdhury, Kini & Natarajan 2024, Provably Robust DPO: Aligning Language Models with "
          "Noisy Feedback (rDPO), arXiv:2403.00409, §3 (the de-biased loss)",
    equation="[(1−ε)·(−log σ(β h)) − ε·(−log σ(−β h))] / (1 − 2ε)",
    summary="Labels flipped at a known rate ε: an unbiased estimate of the clean DPO loss (cDPO, "
            "`dpo` with label_smoothing, is biased). Unbounded below, so keep ε honest.")
def robust(inputs: LossInputs, p: RobustParams) -> LossOutput:
    """rDPO: L = [(1−ε)·sp(−βh) − ε·sp(βh)] / (1 − 2ε).

    Unlike cDPO, the flipped-label term is *subtracted*: the expectation over random flips with
    rate ε equals the clean DPO loss. L can be negative (L → −∞ as h → ∞ for ε > 0), and
    L(h) − L(−h) = −βh/(1 − 2ε): swapping a pair always costs βh/(1 − 2ε).

    Hand check (β = 0.1, ε = 0.1): pair A, h = 3: sp(−0.3) = 0.554355, sp(0.3) = 0.854355,
    L = (0.9·0.554355 − 0.1·0.854355)/0.8 = (0.498920 − 0.085436)/0.8 = 0.516855;
    pair B, h = 2: sp(−0.2) = 0.598139, sp(0.2) = 0.798139,
    L = (0.538325 − 0.079814)/0.8 = 0.573139. ε = 0 is DPO; at h = 0, L = log 2 for every ε.
    """
    r_w, r_l = log_ratios(inputs)
    z = p.beta * (r_w - r_l)
    eps = p.label_smoothing
    losses = ((1 - eps) * F.softplus(-z) - eps * F.softplus(z)) / (1 - 2 * eps)
    return LossOutput(losses, *_rewards(p, r_w, r_l))


# ---------------------------------------------------------------------------------- dpop (Smaug)
@dataclass
class DPOPParams:
    beta: float = param(0.1, "β of DPO's implicit reward.", gt=0)
    dpop_lambda: float = param(50.0, "λ: weight of the penalty max(0, log πref(y_w) − log πθ(y_w)) that "
                                     "stops the chosen likelihood from falling below the reference "
                                     "(the paper uses 50). 0 is plain DPO.", ge=0)


@register(
    "dpop", params=DPOPParams,
    paper="Pal et al. 2024, Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive, "
          "arXiv:2402.13228, §3 (the DPOP loss)",
    equation="−log σ(β·(h − λ·max(0, log πref(y_w) − log πθ(y_w))))",
    summary="DPO that may not lower the chosen likelihood below the reference: for pairs with small "
            "edit distance (math, reasoning), where DPO pushes both completions down.")
def dpop(inputs: LossInputs, p: DPOPParams) -> LossOutput:
    """DPO-Positive: L = −log σ(β·(h − λ·max(0, −r_w))).

    The penalty max(0, log πref(y_w|x) − log πθ(y_w|x)) = max(0, −r_w) is zero whenever
    πθ(y_w) ≥ πref(y_w), where DPOP equals DPO. Metric ``dpop/penalty``: the penalty per pair.

    Hand check (β = 0.1, λ = 2): pair A, r_w = 2 (no penalty), h = 3: L = sp(−0.3) = 0.554355,
    DPO's value; pair B, r_w = −1 (penalty 1), h = 2: L = −log σ(0.1·(2 − 2·1)) = log 2 =
    0.693147, where DPO gives sp(−0.2) = 0.598139.
    """
    r_w, r_l = log_ratios(inputs)
    penalty = torch.relu(-r_w)
    losses = F.softplus(-p.beta * ((r_w - r_l) - p.dpop_lambda * penalty))
    return LossOutput(losses, *_rewards(p, r_w, r_l), {"dpop/penalty": penalty.detach()})


# ---------------------------------------------------------------------------------- odpo
# How the offset Δ is made from the data: from the scores s_w, s_l, or the margin column as given.
ODPO_OFFSETS = ("scores", "difference", "log_ratio", "margin")
_SCORE_OFFSETS = {  # offset -> (Δ/α from the scores, the condition on them, the condition and Δ in words)
    "scores": (lambda w, l: torch.log(w - l), lambda w, l: w - l > 0,
               "score_chosen > score_rejected", "α·log(score_chosen − score_rejected)"),
    "log_ratio": (lambda w, l: torch.log(w) - torch.log(l), lambda w, l: (w > 0) & (l > 0),
                  "score_chosen > 0 and score_rejected > 0", "α·log(score_chosen / score_rejected)"),
    "difference": (lambda w, l: w - l, lambda w, l: torch.isfinite(w - l),
                   "finite scores", "α·(score_chosen − score_rejected)"),
}


@dataclass
class ODPOParams:
    beta: float = param(0.1, "β of DPO's implicit reward.", gt=0)
    offset: str = param("scores", "How the offset Δ is made from the score_chosen / score_rejected columns: "
                                  "'scores' Δ = α·log(s_w − s_l) (the paper's choice and its code's default); "
                                  "'log_ratio' Δ = α·log(s_w / s_l) (the code's ratio=True; positive scores; "
                                  "scale-free: ratings ×10 give the same offset); 'difference' Δ = α·(s_w − s_l) "
                                  "(no log); these two are the paper's scaling-function ablation. 'margin' uses "
                                  "the margin column as Δ, as given.", choices=ODPO_OFFSETS)
    alpha: float = param(1.0, "α: strength of the offset made from the scores (1 in the authors' code; their "
                              "README's IMDb command uses 0.5). 0 is DPO. Not with offset: margin; scale a margin "
                              "column in the data instead.", ge=0)

    def validate(self) -> None:
        if self.offset == "margin" and self.alpha != 1.0:
            raise ValueError("alpha scales the offset made from score_chosen and score_rejected and has no "
                             "effect with offset: margin (the margin column is the offset as given); scale "
                             "the column instead, or use offset: scores, log_ratio or difference")


def _odpo_columns(p: ODPOParams) -> tuple[str, ...]:
    return ("margin",) if p.offset == "margin" else ("score_chosen", "score_rejected")


def _odpo_record_problem(extras: dict, p: ODPOParams) -> str | None:
    """At load time: a pair whose scores cannot give the offset is a bad record."""
    if p.offset == "margin":
        return None
    w, l = (torch.tensor(float(extras[k]), dtype=torch.float64) for k in ("score_chosen", "score_rejected"))
    _, usable, needs, formula = _SCORE_OFFSETS[p.offset]
    if not bool(usable(w, l)):
        return (f"odpo (offset: {p.offset}) needs {needs}, got {float(w):g} and {float(l):g}: the offset is "
                f"{formula}; fix or drop the pair, or give the offset in a margin column with offset: margin")
    return None


def _odpo_offset(inputs: LossInputs, p: ODPOParams) -> Tensor:
    dtype = inputs.policy_chosen_logps.dtype
    if p.offset == "margin":
        return inputs.extras["margin"].to(dtype)
    w = inputs.extras["score_chosen"].to(dtype)
    l = inputs.extras["score_rejected"].to(dtype)
    offset, usable, needs, formula = _SCORE_OFFSETS[p.offset]
    bad = ~usable(w, l)  # also catches NaN
    if bad.any():
        where = bad.nonzero().flatten()
        shown = ", ".join(f"#{i}: {float(w[i]):g} and {float(l[i]):g}" for i in where[:5].tolist())
        raise ValueError(
            f"odpo (offset: {p.offset}) needs {needs} for every pair, since the offset is {formula}; "
            f"{len(where)} pair(s) in this batch do not (batch position: score_chosen and score_rejected) "
            f"{shown}. Fix or drop those pairs (a tie carries no preference), or give the offset directly "
            f"in a `margin` column with offset: margin")
    return p.alpha * offset(w, l)


@register(
    "odpo", params=ODPOParams, columns=_odpo_columns, record_check=_odpo_record_problem,
    paper="Amini, Vieira & Cotterell 2024, Direct Preference Optimization with an Offset, "
          "arXiv:2402.10571 (ACL Findings), §3 ODPO loss, Δ_r = α·f(score(y_w) − score(y_l)), f increasing; "
          "offset scores: f = log, as the experiments and the authors' code (rycolab/odpo); log_ratio (the "
          "code's ratio=True) and difference: the paper's scaling-function ablation",
    equation="−log σ(β h − Δ), Δ = α·log(s_w − s_l), α·log(s_w/s_l), α·(s_w − s_l) or the margin column",
    summary="Pairs with scores (a reward model's or annotators' ratings): the margin demanded grows "
            "with how much better the chosen is. Data-efficient when pairs are few.")
def odpo(inputs: LossInputs, p: ODPOParams) -> LossOutput:
    """ODPO: L = −log σ(β·h − Δ) = sp(Δ − β·h).

    The paper defines the offset as Δ_r = α·f(score(x, y_w) − score(x, y_l)) with f an increasing
    scaling function; its experiments use f = log, and its ablation of the scaling function
    compares log r(y_w) − log r(y_l) and r(y_w) − r(y_l) with it. The authors' code
    (``preference_loss(..., offset=True)``) computes ``-logsigmoid(β·h − α·log(r_w − r_l))``, or
    with ``ratio=True`` ``α·log(r_w / r_l)``; it has no difference option.

    Δ from the ``score_chosen``/``score_rejected`` columns s_w, s_l, by ``offset``:
    scores: Δ = α·log(s_w − s_l) (the paper's choice and the code's default; the log keeps the
    offset moderate; as in the authors' code it is not rescaled otherwise, so score differences
    below 1 give a negative offset); a pair with s_w ≤ s_l raises a ValueError (a bad record at
    load time).
    log_ratio: Δ = α·log(s_w/s_l) = α·(log s_w − log s_l) (the code's ratio=True; an ablation in
    the paper), for positive scores: the offset depends on how many times better the chosen is,
    so it does not change when every score is multiplied by a constant (ratings on another
    scale); s_w < s_l gives a negative offset.
    difference: Δ = α·(s_w − s_l), the score gap itself (no log; the paper's other ablation).
    margin: the ``margin`` column as Δ. Δ = 0 (α = 0, or a zero margin) is DPO. Metric
    ``odpo/offset``: Δ per pair.

    Hand check (β = 0.1, α = 1): pair A, h = 3, scores 8 and 3: Δ = log 5 = 1.609438,
    L = sp(1.609438 − 0.3) = log(1 + e^1.309438) = log(1 + 3.704091) = 1.548433; pair B, h = 2,
    scores 7 and 6.5: Δ = log 0.5 = −0.693147, L = sp(−0.693147 − 0.2) = log(1 + 0.5·e^−0.2)
    = log(1.409365) = 0.343140. With offset: margin and margins [0.5, 0]: L = sp(0.5 − 0.3) =
    sp(0.2) = 0.798139 and sp(−0.2) = 0.598139 (DPO). log_ratio: pair A, scores 8 and 2:
    Δ = log 4 = 1.386294, L = log(1 + 4·e^−0.3) = log(3.963273) = 1.377070; pair B, scores 7 and
    3.5: Δ = log 2, L = log(1 + 2·e^−0.2) = log(2.637462) = 0.969817. difference with α = 0.5:
    pair A, scores 8 and 3: Δ = 2.5, L = sp(2.2) = 2.305083; pair B, 7 and 6.5: Δ = 0.25,
    L = sp(0.05) = 0.718460.
    """
    r_w, r_l = log_ratios(inputs)
    delta = _odpo_offset(inputs, p)
    losses = F.softplus(delta - p.beta * (r_w - r_l))
    return LossOutput(losses, *_rewards(p, r_w, r_l), {"odpo/offset": delta.detach()})


# ---------------------------------------------------------------------------------- sppo_hard
@dataclass
class SPPOParams:
    beta: float = param(0.1, "β = 1/η of SPPO (η is the paper's step size): r_w is pulled to +1/(2β) and "
                             "r_l to −1/(2β), so smaller β asks for larger log-ratios.", gt=0)


@register(
    "sppo_hard", params=SPPOParams,
    paper="Wu et al. 2024, Self-Play Preference Optimization for Language Model Alignment, "
          "arXiv:2405.00675, Algorithm 1 eq. 4.7 with hard labels P(y_w ≻ π) = 1, P(y_l ≻ π) = 0 "
          "(as in TRL), η = 1/β",
    equation="(r_w − 1/(2β))² + (r_l + 1/(2β))²",
    summary="Self-play iterations on pairs: regresses each log-ratio to a fixed target (IPO-like, per "
            "completion rather than per margin). The paper's soft win rates need a preference model.")
def sppo_hard(inputs: LossInputs, p: SPPOParams) -> LossOutput:
    """SPPO, hard-label approximation: L = (r_w − 1/(2β))² + (r_l + 1/(2β))².

    SPPO's square loss (log πθ(y)/πt(y) − η·(P̂(y ≻ πt) − ½))² with η = 1/β and the estimated win
    probability P̂ replaced by 1 for the chosen and 0 for the rejected. The reference is the
    previous iterate πt. Swapping a pair changes L by 4·(1/(2β))·h = 2h/β.

    Hand check (β = 0.1, targets ±5): pair A, r_w = 2, r_l = −1: (2 − 5)² + (−1 + 5)² = 9 + 16 =
    25; pair B, r_w = −1, r_l = −3: 36 + 4 = 40. β = 0.5 (targets ±1): A: 1 + 0 = 1, B: 4 + 4 = 8.
    At πθ = πref: 2·(1/(2β))² = 1/(2β²) = 50.
    """
    r_w, r_l = log_ratios(inputs)
    target = 1 / (2 * p.beta)
    losses = (r_w - target) ** 2 + (r_l + target) ** 2
    return LossOutput(losses, *_rewards(p, r_w, r_l))


# ---------------------------------------------------------------------------------- nca_pair
@dataclass
class BetaParams:
    beta: float = param(0.1, "β of the implicit reward β·log(πθ/πref).", gt=0)


@register(
    "nca_pair", params=BetaParams,
    paper="Chen et al. 2024, Noise Contrastive Alignment of Language Models with Explicit Rewards, "
          "arXiv:2402.05369, NCA loss for pairwise preferences (K = 2)",
    equation="−log σ(β r_w) − ½·log σ(−β r_w) − ½·log σ(−β r_l)",
    summary="Optimises absolute, not relative, likelihoods: the chosen's likelihood goes up instead of "
            "both falling as under DPO. Good for reasoning/math preference data.")
def nca_pair(inputs: LossInputs, p: BetaParams) -> LossOutput:
    """NCA, pairwise: L = sp(−βr_w) + ½·sp(βr_w) + ½·sp(βr_l).

    Each completion is classified on its own reward βr (σ of it): the chosen as positive, and
    both completions as negative with weight ½ (the noise-contrastive term over the K = 2
    responses). Swapping a pair changes L by sp(−βr_l) − sp(−βr_w).

    Hand check (β = 0.1): pair A, βr_w = 0.2, βr_l = −0.1: sp(−0.2) + ½·sp(0.2) + ½·sp(−0.1) =
    0.598139 + 0.399069 + 0.322198 = 1.319407; pair B, βr_w = −0.1, βr_l = −0.3:
    sp(0.1) + ½·sp(−0.1) + ½·sp(−0.3) = 0.744397 + 0.322198 + 0.277178 = 1.343773.
    At πθ = πref: 2·log 2.
    """
    r_w, r_l = log_ratios(inputs)
    a, b = _rewards(p, r_w, r_l)
    losses = F.softplus(-a) + 0.5 * F.softplus(a) + 0.5 * F.softplus(b)
    return LossOutput(losses, a, b)


# ---------------------------------------------------------------------------------- apo
_APO_PAPER = ("D'Oosterlinck et al. 2024, Anchored Preference Optimization and Contrastive Revisions, "
              "arXiv:2408.06266, ")


@register(
    "apo_zero", params=BetaParams, paper=_APO_PAPER + "eq. 7 (APO-zero)",
    equation="(1 − σ(β r_w)) + σ(β r_l)",
    summary="Chosen completions better than the model's own outputs (e.g. from a stronger model): "
            "raises the chosen likelihood and lowers the rejected, each anchored at the reference.")
def apo_zero(inputs: LossInputs, p: BetaParams) -> LossOutput:
    """APO-zero: L = (1 − σ(βr_w)) + σ(βr_l) = σ(−βr_w) + σ(βr_l).

    Hand check (β = 0.1): pair A, βr_w = 0.2, βr_l = −0.1: σ(−0.2) + σ(−0.1) = 0.450166 +
    0.475021 = 0.925187; pair B, βr_w = −0.1, βr_l = −0.3: σ(0.1) + σ(−0.3) = 0.524979 +
    0.425557 = 0.950537. At πθ = πref: ½ + ½ = 1.
    """
    r_w, r_l = log_ratios(inputs)
    a, b = _rewards(p, r_w, r_l)
    return LossOutput(torch.sigmoid(-a) + torch.sigmoid(b), a, b)


@register(
    "apo_down", params=BetaParams, paper=_APO_PAPER + "eq. 8 (APO-down)",
    equation="σ(β r_w) + (1 − σ(β h))",
    summary="Chosen completions worse than the model's own outputs: lowers both likelihoods, the "
            "rejected more, so the model learns the contrast without imitating the chosen.")
def apo_down(inputs: LossInputs, p: BetaParams) -> LossOutput:
    """APO-down: L = σ(βr_w) + (1 − σ(βh)) = σ(βr_w) + σ(−βh).

    Hand check (β = 0.1): pair A, βr_w = 0.2, βh = 0.3: σ(0.2) + σ(−0.3) = 0.549834 + 0.425557 =
    0.975391; pair B, βr_w = −0.1, βh = 0.2: σ(−0.1) + σ(−0.2) = 0.475021 + 0.450166 = 0.925187.
    At πθ = πref: 1.
    """
    r_w, r_l = log_ratios(inputs)
    a, b = _rewards(p, r_w, r_l)
    return LossOutput(torch.sigmoid(a) + torch.sigmoid(-(a - b)), a, b)


# ---------------------------------------------------------------------------------- exo_pair
@dataclass
class EXOParams:
    beta: float = param(0.1, "β of the policy's implicit reward β·log(πθ/πref).", gt=0)
    label_smoothing: float = param(1e-3, "ε: the target distribution over the pair is (1−ε, ε); must be "
                                         "> 0 (the reverse KL to a one-hot target is infinite). 1e-3 is "
                                         "the value TRL attributes to the paper.", gt=0, lt=0.5)


@register(
    "exo_pair", params=EXOParams,
    paper="Ji et al. 2024, Towards Efficient Exact Optimization of Language Model Alignment (EXO), "
          "arXiv:2402.00856, EXO-pref with K = 2 and label smoothing ε, as TRL's loss_type exo_pair (which "
          "cites the paper's eq. 16)",
    equation="KL((σ(βh), σ(−βh)) ‖ (1−ε, ε))",
    summary="Reverse KL instead of DPO's forward KL: mode-seeking, so the policy concentrates on the "
            "preferred behaviour; its minimum sits at a finite margin βh = log((1−ε)/ε).")
def exo_pair(inputs: LossInputs, p: EXOParams) -> LossOutput:
    """EXO, pairwise: L = σ(βh)·(log σ(βh) − log(1−ε)) + σ(−βh)·(log σ(−βh) − log ε).

    The reverse KL from the policy's pair distribution (σ(βh), σ(−βh)) to the smoothed label
    (1−ε, ε): L ≥ 0, with L = 0 at σ(βh) = 1−ε, i.e. βh = log((1−ε)/ε) (6.906755 at ε = 1e-3).
    At h = 0 (πθ = πref): L = ½(log ½ − log(1−ε)) + ½(log ½ − log ε) = −log 2 − ½·log(ε(1−ε))
    = −0.693147 + 3.453878 + 0.000500 = 2.761231 at ε = 1e-3. Swapping a pair changes L by
    (σ(βh) − σ(−βh))·log((1−ε)/ε). This is TRL's exo_pair; the authors' own pairwise code
    (exact_loss, loss_type exo-pref) uses the unnormalised target log q = (0, −10) instead of
    (log(1−ε), log ε), i.e. ε ≈ e^−10 without the 1−ε.

    Hand check (β = 0.1, ε = 1e-3): pair A, βh = 0.3: σ(0.3) = 0.574443, log σ(0.3) = −0.554355,
    log σ(−0.3) = −0.854355: 0.574443·(−0.554355 + 0.001001) + 0.425557·(−0.854355 + 6.907755)
    = −0.317870 + 2.576070 = 2.258199; pair B, βh = 0.2: σ(0.2) = 0.549834:
    0.549834·(−0.598139 + 0.001001) + 0.450166·(−0.798139 + 6.907755) = −0.328327 + 2.750342 =
    2.422015.
    """
    r_w, r_l = log_ratios(inputs)
    z = p.beta * (r_w - r_l)
    eps = p.label_smoothing
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    return LossOutput(losses, *_rewards(p, r_w, r_l))


# ---------------------------------------------------------------------------------- bco_pair
@register(
    "bco_pair", params=BetaParams, stateful=True,
    paper="Jung et al. 2024, Binary Classifier Optimization for Large Language Model Alignment (BCO), "
          "arXiv:2404.04656, the BCO loss with reward shift δ, applied to both completions of a pair "
          "(TRL's bco_pair name; TRL 1.16 has dropped δ, prefopt keeps the paper's)",
    equation="−log σ(β r_w − δ) − log σ(−(β r_l − δ)), δ = running mean of β·r",
    summary="A binary classifier on each completion's reward (chosen = 1, rejected = 0) around a "
            "running reward mean δ (the paired form of BCO).")
def bco_pair(inputs: LossInputs, p: BetaParams) -> LossOutput:
    """BCO on pairs: L = sp(−(βr_w − δ)) + sp(βr_l − δ).

    δ, the reward shift, is the mean of every reward βr_w, βr_l seen so far **including this
    batch**, kept in ``inputs.state`` as ``count`` (rewards seen) and ``mean``:
    mean ← mean + (m_batch − mean)·n/(count + n), count ← count + n, with n = 2B and m_batch the
    (detached) mean of the batch's 2B rewards. Every reward weighs the same, so the δ at the end
    of an optimizer step does not depend on how the step was split into micro-batches. Without a
    state dict δ is the batch
    mean. With several processes the batch mean is averaged over all of them first, so every
    process holds the same δ (and the checkpointed state is every process's). Evaluation passes a copy of the state:
    δ then includes the evaluated batch but is not stored. Metric ``bco/delta``.

    TRL 1.16 no longer has δ: its DPOTrainer's bco_pair is −log σ(βr_w) − log σ(−βr_l), with no
    running mean (the RunningMoments class is gone from the package), i.e. this loss at δ = 0.
    prefopt keeps the paper's reward shift; TRL's earlier releases (the DPOTrainer's bco_pair
    with RunningMoments) updated it with the scalar batch mean, so every micro-batch weighed as one
    sample where prefopt weighs every reward the same (the two agree on equal micro-batches).

    Hand check (β = 0.1), one state dict across two calls. Call 1, pairs A (r_w = 2, r_l = −1)
    and B (r_w = −1, r_l = −3): rewards βr_w = [0.2, −0.1], βr_l = [−0.1, −0.3], mean −0.3/4 =
    −0.075, count 4, δ = −0.075: A: sp(−(0.2 + 0.075)) + sp(−0.1 + 0.075) = sp(−0.275) + sp(−0.025)
    = 0.565071 + 0.680725 = 1.245796; B: sp(0.025) + sp(−0.225) = 0.705725 + 0.586962 = 1.292687.
    Call 2, one pair r_w = 3, r_l = 1 (rewards 0.3, 0.1, batch mean 0.2): count 6,
    δ = (4·(−0.075) + 2·0.2)/6 = 0.1/6 = 0.016667: L = sp(−0.283333) + sp(0.083333) =
    0.561482 + 0.735682 = 1.297164. At πθ = πref on a fresh state: δ = 0, L = 2·log 2.
    """
    r_w, r_l = log_ratios(inputs)
    a, b = _rewards(p, r_w, r_l)
    rewards = torch.cat([a, b]).detach()
    state = inputs.state if inputs.state is not None else {}
    count = int(state.get("count", 0))  # a Python int: updating it needs no device sync
    mean = torch.as_tensor(state.get("mean", 0.0), dtype=torch.float64, device=a.device)
    n = rewards.numel()
    total = count + n
    batch_mean = inputs.global_mean(rewards.double().mean())  # over every process, as in TRL
    mean = mean + (batch_mean - mean) * (n / total)
    state["count"], state["mean"] = total, mean
    delta = mean.to(a.dtype)
    losses = F.softplus(-(a - delta)) + F.softplus(b - delta)
    return LossOutput(losses, a, b, {"bco/delta": delta})


# ---------------------------------------------------------------------------------- aot
@dataclass
class AOTParams:
    beta: float = param(0.1, "β of the implicit reward.", gt=0)
    label_smoothing: float = param(0.0, "ε of the smoothed logistic loss on the sorted differences "
                                        "(as cDPO's).", ge=0, lt=0.5)


_AOT_PAPER = ("Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport (AOT), "
              "arXiv:2406.05882, ")


@register(
    "aot", params=AOTParams,
    paper=_AOT_PAPER + "the paired objective (first-order stochastic dominance of the policy's log-ratio "
                       "margins over the reference's, via sorting) with the logistic loss",
    equation="Δ = sort_B(log πθ(y_w)−log πθ(y_l)) − sort_B(log πref(y_w)−log πref(y_l)); "
             "−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)",
    summary="Batch-level: aligns the distribution of margins rather than each pair; use large "
            "micro-batches. A batch of one is DPO.")
def aot(inputs: LossInputs, p: AOTParams) -> LossOutput:
    """AOT (paired): the policy's margins u_i = log πθ(y_w) − log πθ(y_l) and the reference's
    v_i are each sorted over the micro-batch; Δ_k = u_(k) − v_(k) (k-th smallest of each), and
    L_k = −(1−ε)·log σ(βΔ_k) − ε·log σ(−βΔ_k).

    **Batch-level**: position k of ``losses`` is the k-th quantile comparison, not pair k, so a
    per-example loss depends on the whole micro-batch (and on how a step is split into
    micro-batches). The losses are still returned per position, shape (B,), so the sum and the
    normalisation by examples are unchanged. With B = 1, Δ = h and AOT is DPO. Rewards are the
    per-pair β·r_w, β·r_l.

    Hand check (β = 0.1, ε = 0): pair 1: chosen −10 (ref −12), rejected −15 (ref −11): u = 5,
    v = −1 (h = 6); pair 2: chosen −8 (ref −7), rejected −9 (ref −9): u = 1, v = 2 (h = −1).
    sort(u) = [1, 5], sort(v) = [−1, 2], Δ = [2, 3]: L = [sp(−0.2), sp(−0.3)] =
    [0.598139, 0.554355] — while DPO on the pairs gives [sp(−0.6), sp(0.1)] = [0.437488, 0.744397].
    """
    u = inputs.policy_chosen_logps - inputs.policy_rejected_logps
    v = inputs.ref_chosen_logps - inputs.ref_rejected_logps
    delta = torch.sort(u).values - torch.sort(v).values
    r_w, r_l = log_ratios(inputs)
    return LossOutput(smoothed_logistic(p.beta * delta, p.label_smoothing), *_rewards(p, r_w, r_l))


@register(
    "aot_unpaired", params=AOTParams,
    paper=_AOT_PAPER + "the unpaired objective (first-order stochastic dominance of the chosen rewards "
                       "over the rejected rewards, via sorting) with the logistic loss; TRL's 'aot_pair'",
    equation="Δ = sort_B(r_w) − sort_B(r_l); −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)",
    summary="Batch-level: asks the chosen rewards to dominate the rejected ones as distributions (the "
            "sort discards which completions were paired). A batch of one is DPO.")
def aot_unpaired(inputs: LossInputs, p: AOTParams) -> LossOutput:
    """AOT (unpaired): Δ_k = r_w,(k) − r_l,(k), the k-th smallest chosen log-ratio against the k-th
    smallest rejected one; L_k = −(1−ε)·log σ(βΔ_k) − ε·log σ(−βΔ_k).

    **Batch-level** like ``aot``: position k is the k-th quantile comparison; returned per
    position, shape (B,). If r_w,i > r_l,i for every pair, every Δ_k > 0 as well. B = 1 is DPO.

    Hand check (β = 0.1, ε = 0), the two pairs of ``aot``: r_w = [2, −1], r_l = [−4, 0];
    sort(r_w) = [−1, 2], sort(r_l) = [−4, 0], Δ = [3, 2]: L = [sp(−0.3), sp(−0.2)] =
    [0.554355, 0.598139].
    """
    r_w, r_l = log_ratios(inputs)
    delta = torch.sort(r_w).values - torch.sort(r_l).values
    return LossOutput(smoothed_logistic(p.beta * delta, p.label_smoothing), *_rewards(p, r_w, r_l))


# ---------------------------------------------------------------------------------- discopop
@dataclass
class DiscoPOPParams:
    beta: float = param(0.1, "β of the implicit reward.", gt=0)
    tau: float = param(0.05, "τ: temperature of the mixing weight σ(βh/τ) between the logistic and the "
                             "exponential loss (the paper's 0.05). τ < 1 keeps the exponential term "
                             "bounded as βh → −∞.", gt=0, lt=1)


@register(
    "discopop", params=DiscoPOPParams, aliases=("lrml",),
    paper="Chris Lu et al. 2024, Discovering Preference Optimization Algorithms with and for Large "
          "Language Models (DiscoPOP), arXiv:2406.08414, eq. 5 (log-ratio modulated loss, LRML)",
    equation="(1 − σ(βh/τ))·(−log σ(βh)) + σ(βh/τ)·exp(−βh)",
    summary="An LLM-discovered blend: logistic (DPO) loss for negative margins, exponential loss for "
            "positive ones. Non-convex, and not monotone in h near 0 (see the docstring).")
def discopop(inputs: LossInputs, p: DiscoPOPParams) -> LossOutput:
    """DiscoPOP / LRML: with z = βh and m = σ(z/τ), L = (1 − m)·sp(−z) + m·e^(−z).

    Computed as σ(−z/τ)·sp(−z) + exp(−z + log σ(z/τ)): the literal m·e^(−z) (TRL's) gives 0·inf =
    NaN once e^(−z) overflows (z ≲ −89 in float32); in log space the exponent z(1/τ − 1) → −∞, so
    the term vanishes. Limits: z ≪ 0 (m → 0): L → sp(−z) = −log σ(z), DPO's logistic loss
    (≈ −z; e.g. z = −10, τ = 0.05: L = sp(10) = 10.000045 to 1e-6); z ≫ 0: L → e^(−z).
    At z = 0: ½·log 2 + ½ = 0.846574. The mixing makes L non-monotone near 0: at τ = 0.05,
    L(0.05) = 0.875181 > L(−0.05) = 0.807966, so swapping a pair with a small positive margin lowers
    the loss; for |z| ≳ 0.1 it behaves (L(0.3) = 0.740357 < L(−0.3) = 0.855580).

    Hand check (β = 0.1, τ = 0.05): pair A, z = 0.3: m = σ(6) = 0.997527, sp(−0.3) = 0.554355,
    e^−0.3 = 0.740818: L = 0.002473·0.554355 + 0.997527·0.740818 = 0.001371 + 0.738987 = 0.740357;
    pair B, z = 0.2: m = σ(4) = 0.982014, sp(−0.2) = 0.598139, e^−0.2 = 0.818731:
    L = 0.017986·0.598139 + 0.982014·0.818731 = 0.010758 + 0.804005 = 0.814763.
    """
    r_w, r_l = log_ratios(inputs)
    z = p.beta * (r_w - r_l)
    losses = torch.sigmoid(-z / p.tau) * F.softplus(-z) + torch.exp(F.logsigmoid(z / p.tau) - z)
    return LossOutput(losses, *_rewards(p, r_w, r_l))


# ---------------------------------------------------------------------------------- sigmoid_norm
@dataclass
class SigmoidNormParams:
    beta: float = param(5.0, "β on *per-token* log-ratios: about |y| times DPO's β for the same pull "
                             "(Tülu 3 uses 5 with length-normalised DPO; SimPO uses 2–10).", gt=0)


@register(
    "sigmoid_norm", params=SigmoidNormParams, inputs=("chosen_lengths", "rejected_lengths"),
    logps="length-averaged",
    paper="Length-normalised DPO as in TRL's sigmoid_norm and Tülu 3 (Lambert et al. 2024, "
          "arXiv:2411.15124); cf. SimPO's length-normalised reward (Meng et al. 2024, arXiv:2405.14734, "
          "eq. 4) and Park et al. 2024, Disentangling Length from Quality in DPO, arXiv:2403.19159",
    equation="−log σ(β·(r_w/|y_w| − r_l/|y_l|))",
    summary="DPO without its length bias: per-token log-ratios, so a longer chosen completion does not "
            "get a larger margin for free. Keeps the reference (SimPO drops it).")
def sigmoid_norm(inputs: LossInputs, p: SigmoidNormParams) -> LossOutput:
    """Length-normalised DPO: L = sp(−β·(r̄_w − r̄_l)), r̄ = r/|y| (lengths clamped to ≥ 1).

    The implicit reward is the length-normalised one, so the reported rewards are β·r̄_w, β·r̄_l
    (TRL reports the unnormalised β·r; the margin metric would then not be the one the loss sees).

    Hand check (β = 5): pair A, r_w = 2 over 5 tokens, r_l = −1 over 3: r̄_w = 0.4,
    r̄_l = −1/3, h̄ = 0.733333, L = sp(−3.666667) = log(1 + e^−3.666667) = 0.025240; pair B,
    r_w = −1 over 2 tokens, r_l = −3 over 4: h̄ = −0.5 + 0.75 = 0.25, L = sp(−1.25) = 0.251929.
    """
    r_w, r_l = log_ratios(inputs, average=True)
    return LossOutput(F.softplus(-p.beta * (r_w - r_l)), *_rewards(p, r_w, r_l))
