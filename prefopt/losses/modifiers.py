"""Loss-term modifiers: mechanisms that apply to any paired loss, registered like losses.

A modifier is switched on by its key inside a loss term (``loss: {name: ipo, ld_alpha: 0.5,
wpo: true}``) and acts through up to two hooks the objective calls around the loss function:

* ``adjust_inputs(inputs, ctx, value) -> LossInputs`` rewrites the loss inputs (LD-DPO);
* ``adjust_output(output, ctx, value) -> LossOutput`` rewrites the per-example losses (WPO);

and it names the per-token statistics the policy pass must compute for it (``token_stats``,
registered in prefopt.logps.TOKEN_STATS). ``ctx`` holds the batch and the policy and reference
``SequenceScores``. The objective, the config parser and `prefopt losses` read this registry;
nothing else knows a modifier by name.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from prefopt.coerce import coerce
from prefopt.errors import ConfigError
from prefopt.losses.base import LossInputs, LossOutput

Tensor = torch.Tensor


@dataclass
class ModifierContext:
    batch: Any                 # prefopt.data.collate.Batch
    policy: Any                # prefopt.logps.SequenceScores
    ref: Any | None            # reference SequenceScores, or None


@dataclass(frozen=True)
class ModifierSpec:
    name: str                  # the key inside a loss term
    type: Any                  # the value's type (coerced like a config value)
    help: str
    paper: str
    check: Callable[[Any], str | None] | None = None     # a problem with the value, or None
    token_stats: tuple[str, ...] = ()
    adjust_inputs: Callable[[LossInputs, ModifierContext, Any], LossInputs] | None = None
    adjust_output: Callable[[LossOutput, ModifierContext, Any], LossOutput] | None = None

    def parse(self, value: Any, where: str) -> Any:
        value = coerce(value, self.type, f"{where}.{self.name}")
        problem = self.check(value) if self.check is not None and self.active(value) else None
        if problem:
            raise ConfigError(f"{where}.{self.name}={value} {problem}")
        return value

    @staticmethod
    def active(value: Any) -> bool:
        return value is not None and value is not False


MODIFIERS: dict[str, ModifierSpec] = {}


def register_modifier(spec: ModifierSpec) -> ModifierSpec:
    if spec.name in MODIFIERS:
        raise AssertionError(f"modifier '{spec.name}' registered twice")
    MODIFIERS[spec.name] = spec
    return spec


# ----------------------------------------------------------------------------- LD-DPO

def length_desensitised(inputs: LossInputs, ctx: ModifierContext, alpha: float) -> LossInputs:
    """LD-DPO (Liu et al. 2024, arXiv:2409.06411, eq. 9): log p = log p(first m tokens) +
    α · log p(the rest), m = min(|y_w|, |y_l|), for policy and reference alike."""
    from prefopt.logps import prefix_logps

    batch = ctx.batch
    ci, ri = batch.index["chosen"], batch.index["rejected"]
    shared = torch.minimum(batch.sequence_lengths[ci], batch.sequence_lengths[ri])
    limits = torch.zeros_like(batch.sequence_lengths)
    limits[ci], limits[ri] = shared, shared

    def ld(scores):
        prefix = prefix_logps(scores, batch, limits)
        mixed = prefix + alpha * (scores.logps - prefix)
        return mixed[ci], mixed[ri]

    pc, pr = ld(ctx.policy)
    changes = {"policy_chosen_logps": pc, "policy_rejected_logps": pr}
    if ctx.ref is not None:
        changes["ref_chosen_logps"], changes["ref_rejected_logps"] = ld(ctx.ref)
    return dataclasses.replace(inputs, **changes)


register_modifier(ModifierSpec(
    name="ld_alpha", type=float | None, paper="Liu et al. 2024, arXiv:2409.06411 (LD-DPO)",
    help="LD-DPO (Liu et al. 2024, arXiv:2409.06411): log-probs of the tokens of the longer "
         "completion beyond the shorter one's length are scaled by this α in [0, 1] (policy and "
         "reference alike), desensitising the loss to verbosity. Any paired loss; None: off.",
    check=lambda a: None if 0 <= a <= 1 else "must be in [0, 1]",
    adjust_inputs=length_desensitised))


# ----------------------------------------------------------------------------- WPO

def _collision_adjusted_logp(logprobs: Tensor, token_logps: Tensor) -> Tensor:
    """log p(y_t) − log Σ_v p(v)²: WPO's token weight with the sampling-distribution alignment."""
    return token_logps - torch.logsumexp(2 * logprobs, dim=-1)


WPO_STAT = "wpo_adjusted_logp"


def wpo_weighting(out: LossOutput, ctx: ModifierContext, on: bool) -> LossOutput:
    """WPO (Zhou et al. 2024, arXiv:2406.11827, eq. 2 with §3.2's alignment): each pair's loss
    times min(1, w(y_w)·w(y_l)), w(y) = exp(mean_t [log πθ(y_t) − log Σ_v πθ(v)²]) (detached)."""
    batch = ctx.batch
    log_w = ctx.policy.stats[WPO_STAT] / batch.sequence_lengths.clamp(min=1)   # (S,)
    weights = torch.exp(log_w[batch.index["chosen"]] + log_w[batch.index["rejected"]]).clamp(max=1.0)
    return dataclasses.replace(out, losses=out.losses * weights, metrics={**out.metrics, "wpo/weight": weights})


def _register_wpo() -> None:
    from prefopt.logps import register_token_stat
    register_token_stat(WPO_STAT, _collision_adjusted_logp)


_register_wpo()
register_modifier(ModifierSpec(
    name="wpo", type=bool, paper="Zhou et al. 2024, arXiv:2406.11827 (WPO)",
    help="WPO weighting (Zhou et al. 2024, arXiv:2406.11827): each pair's loss is multiplied by "
         "min(1, w(y_w)·w(y_l)), w(y) = exp(mean_t [log πθ(y_t) − log Σ_v πθ(v)²]) (detached), "
         "so pairs the policy would itself generate weigh more. Any paired loss.",
    token_stats=(WPO_STAT,), adjust_output=wpo_weighting))
