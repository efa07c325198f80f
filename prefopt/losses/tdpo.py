"""Token-level Direct Preference Optimization (TDPO1, TDPO2).

Zeng et al. 2024, Token-level Direct Preference Optimization, ICML 2024, arXiv:2404.11999.
TDPO adds to DPO's margin the difference of the sequential forward KL divergences

    D_SeqKL(x, y; πref ‖ πθ) = Σ_t KL(πref(·|x, y<t) ‖ πθ(·|x, y<t))

of the rejected and the chosen completion. prefopt.logps computes these sums from the
reference's per-token distributions (``chosen_seq_kl``, ``rejected_seq_kl``, differentiable
w.r.t. the policy) for every loss registered with ``token_level=True``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from prefopt.losses.base import LossInputs, LossOutput, param, register
from prefopt.losses.common import log_ratios


def _seq_kl_metrics(inputs: LossInputs) -> dict:
    return {"tdpo/seq_kl_chosen": inputs.chosen_seq_kl.detach(),
            "tdpo/seq_kl_rejected": inputs.rejected_seq_kl.detach()}


@dataclass
class TDPO1Params:
    beta: float = param(0.1, "β: inverse temperature, as in DPO; scales both the log-ratio margin "
                             "and the SeqKL difference.", gt=0)


@register(
    "tdpo1", params=TDPO1Params, token_level=True,
    paper="Zeng et al. 2024, Token-level Direct Preference Optimization, arXiv:2404.11999, "
          "L_TDPO1 (§4; official code: tdpo_loss with if_tdpo2=False)",
    equation="−log σ(β h − β(D_SeqKL(y_l) − D_SeqKL(y_w))), D_SeqKL = Σ_t KL(πref ‖ πθ)",
    summary="DPO with a token-level forward-KL correction: better alignment/diversity trade-off "
            "than DPO. Needs token-level reference distributions (a reference model).")
def tdpo1(inputs: LossInputs, p: TDPO1Params) -> LossOutput:
    """TDPO1: L = −log σ(u − δ), u = β·h, δ = β·(D_SeqKL(x, y_l) − D_SeqKL(x, y_w)).

    With identical policy and reference both SeqKLs are 0 and the loss is DPO's exactly.
    Rewards β·r_w and β·r_l, as DPO (the official code logs β·(r + D_SeqKL) instead).
    Metrics ``tdpo/seq_kl_chosen``, ``tdpo/seq_kl_rejected``.

    Hand check: β = 0.1, r_w = 2, r_l = −1 (h = 3), D_SeqKL(y_w) = 1, D_SeqKL(y_l) = 4:
    z = 0.1·(3 − 3) = 0, L = log 2 = 0.693147. r_w = −1, r_l = 1 (h = −2), SeqKL 2 and 0:
    z = 0.1·(−2 − (0 − 2)) = 0, L = log 2.
    """
    r_w, r_l = log_ratios(inputs)
    reward_w, reward_l = p.beta * r_w, p.beta * r_l
    delta = p.beta * inputs.rejected_seq_kl - p.beta * inputs.chosen_seq_kl
    losses = -F.logsigmoid(reward_w - reward_l - delta)
    return LossOutput(losses, reward_w, reward_l, metrics=_seq_kl_metrics(inputs))


@dataclass
class TDPO2Params:
    beta: float = param(0.1, "β: inverse temperature, as in DPO.", gt=0)
    alpha: float = param(0.5, "α: weight of the SeqKL difference (the paper's and the official "
                              "code's default is 0.5).", ge=0)


@register(
    "tdpo2", params=TDPO2Params, token_level=True,
    paper="Zeng et al. 2024, Token-level Direct Preference Optimization, arXiv:2404.11999, "
          "L_TDPO2 (§4; official code: tdpo_loss with if_tdpo2=True, alpha=0.5)",
    equation="−log σ(β h − α(β D_SeqKL(y_l) − sg(β D_SeqKL(y_w)))), sg = stop-gradient",
    summary="TDPO with the chosen's SeqKL detached and the correction weighted by α: the variant "
            "the paper recommends for stability. Needs token-level reference distributions.")
def tdpo2(inputs: LossInputs, p: TDPO2Params) -> LossOutput:
    """TDPO2: L = −log σ(u − α·δ₂), u = β·h, δ₂ = β·D_SeqKL(x, y_l) − sg(β·D_SeqKL(x, y_w)).

    The stop-gradient on the chosen's SeqKL means no gradient reaches ``chosen_seq_kl``; the
    rejected's SeqKL keeps its gradient. With identical policy and reference it is DPO exactly.
    Rewards β·r_w and β·r_l (as DPO). Metrics ``tdpo/seq_kl_chosen``, ``tdpo/seq_kl_rejected``.

    Hand check: β = 0.1, α = 0.5, r_w = 2, r_l = −1 (h = 3), SeqKL 1 (chosen) and 4 (rejected):
    z = 0.1·(3 − 0.5·3) = 0.15, L = log(1 + e^−0.15) = 0.620957. r_w = −1, r_l = 1 (h = −2),
    SeqKL 2 and 0: z = 0.1·(−2 − 0.5·(−2)) = −0.1, L = log(1 + e^0.1) = 0.744397.
    """
    r_w, r_l = log_ratios(inputs)
    reward_w, reward_l = p.beta * r_w, p.beta * r_l
    delta2 = p.beta * inputs.rejected_seq_kl - (p.beta * inputs.chosen_seq_kl).detach()
    losses = -F.logsigmoid(reward_w - reward_l - p.alpha * delta2)
    return LossOutput(losses, reward_w, reward_l, metrics=_seq_kl_metrics(inputs))
