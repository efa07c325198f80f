"""Reward-model training: the Bradley–Terry pairwise loss on a scalar reward head.

The model is a sequence classifier with one output (``AutoModelForSequenceClassification``,
``num_labels=1``) whose reward of (x, y) is read at the last token of y (its EOS), in every
batch layout (prefopt.rewards). The rewards arrive in the ``*_logps`` fields of LossInputs
(``scores="reward"`` tells the objective to fill them with rewards, not log-probs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from prefopt.losses.base import LossInputs, LossOutput, param, register


@dataclass
class BradleyTerryParams:
    center_rewards_coefficient: float = param(
        0.0, "λ of the reward-centering term λ·(r_w + r_l)² (Eisenstein et al. 2023; TRL's "
             "center_rewards_coefficient, 0.01 there): keeps rewards near zero mean.", ge=0)
    use_margin: bool = param(False, "Subtract the per-pair `margin` column from the reward difference "
                                "(Llama 2's margin loss, Touvron et al. 2023, eq. 2).")


@register(
    "bradley_terry", params=BradleyTerryParams, reference=False, scores="reward", aliases=("reward",),
    columns=lambda p: ("margin",) if p.use_margin else (),
    logps="one scalar per sequence, read at its last token",
    paper="Bradley & Terry 1952; Ouyang et al. 2022 (InstructGPT), eq. 1; margin: Touvron et al. 2023 "
          "(Llama 2), eq. 2; centering: Eisenstein et al. 2023, arXiv:2312.09244",
    equation="−log σ(r(x,y_w) − r(x,y_l) − m) + λ·(r(x,y_w) + r(x,y_l))²",
    summary="Trains a reward model (prefopt rm) on preference pairs: the chosen should score higher. "
            "The trained model serves as a judge (judge: {name: reward_model, path: ...}).")
def bradley_terry(inputs: LossInputs, p: BradleyTerryParams) -> LossOutput:
    """L = −log σ(r_w − r_l − m) + λ·(r_w + r_l)².

    Hand check: r_w = 1.0, r_l = −0.5: −log σ(1.5) = 0.201413; with m = 0.5: −log σ(1.0) =
    0.313262; with λ = 0.01 (and m = 0): 0.201413 + 0.01·0.25 = 0.203913.
    """
    r_w, r_l = inputs.policy_chosen_logps, inputs.policy_rejected_logps
    diff = r_w - r_l
    if p.use_margin:
        diff = diff - inputs.extras["margin"]
    losses = -F.logsigmoid(diff)
    if p.center_rewards_coefficient:
        losses = losses + p.center_rewards_coefficient * (r_w + r_l) ** 2
    return LossOutput(losses, r_w.detach(), r_l.detach())
