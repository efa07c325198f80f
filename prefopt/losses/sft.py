"""Supervised fine-tuning: negative log-likelihood of the target completion."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prefopt.losses.base import LossInputs, LossOutput, register


@dataclass
class SFTParams:
    """SFT has no parameters; its weight in a mixed objective is the term's `weight`."""


@register(
    "sft", params=SFTParams, data="any", reference=False, normalize="token", aliases=("nll",),
    paper="Ouyang et al. 2022 (InstructGPT), supervised fine-tuning stage",
    equation="−Σ_t log πθ(y_t|x, y<t) / (target tokens in the optimizer step)",
    summary="Supervised fine-tuning on the chosen (or desirable) completions; mixed with a "
            "preference loss it anchors the chosen likelihood.")
def sft(inputs: LossInputs, p: SFTParams) -> LossOutput:
    """Token-level NLL of the target completions.

    Per example the loss is the *summed* NLL −log πθ(y|x); the loop divides the step's sum
    by the number of target tokens in the whole optimizer step (all micro-batches and
    processes), so every token weighs the same whatever the micro-batching. Targets are the
    chosen completions of paired data, or the desirable (label True, or unlabelled)
    completions of unpaired data; undesirable ones contribute 0.

    Hand check: target log-probs −6 over 3 tokens and −2 over 1 token give per-example
    losses (6, 2) and a step loss (6 + 2) / 4 = 2.
    """
    if inputs.paired:
        return LossOutput(-inputs.policy_chosen_logps)
    losses = -inputs.policy_logps
    if inputs.labels is not None:
        losses = torch.where(inputs.labels.bool(), losses, torch.zeros_like(losses))
    return LossOutput(losses)
