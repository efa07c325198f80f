"""The objective: one or more registered losses, weighted, over one reference strategy.

The objective is the single place that knows how a Batch becomes LossInputs:

    batch ──score_batch(policy)──▶ SequenceScores ─┐
    batch ──reference.scores────▶ SequenceScores ─┴─▶ LossInputs ──terms──▶ LossOutputs

It reads the registry flags of its terms to decide which data kind it consumes
(paired / unpaired / completion), which roles the collator must build, whether the
reference runs and whether token-level statistics are needed, and how each term's
per-example losses are normalised. The training loop only calls ``units``, ``forward``
and ``metrics``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from prefopt.config import LossTerm
from prefopt.data.collate import Batch
from prefopt.errors import ConfigError
from prefopt.logps import SequenceScores, score_batch
from prefopt.losses import LossInputs, LossOutput, LossSpec, check_inputs, get_spec

Tensor = torch.Tensor


@dataclass
class Term:
    spec: LossSpec
    params: Any
    weight: float
    label: str  # metric name suffix: loss/<label>

    @classmethod
    def from_config(cls, term: LossTerm, label: str) -> "Term":
        return cls(get_spec(term.name), term.resolved_params(), term.weight, label)


@dataclass
class StepOutput:
    loss: Tensor                 # scalar: Σ_k w_k Σ_i losses_k[i] / units_k (units of the whole step)
    outputs: list[LossOutput]    # one per term
    inputs: LossInputs
    policy: SequenceScores


class Objective:
    def __init__(self, terms: list[Term], reference):
        if not terms:
            raise ConfigError("the objective needs at least one loss")
        kinds = {t.spec.data for t in terms} - {"any"}
        if len(kinds) > 1:
            raise ConfigError("cannot mix paired and unpaired losses in one objective: "
                              + ", ".join(f"{t.spec.name} ({t.spec.data})" for t in terms))
        self.terms = terms
        self.kind = {"paired": "paired", "unpaired": "unpaired"}.get(next(iter(kinds), ""), "completion")
        self.reference = reference
        self.needs_reference = any(t.spec.needs_reference(t.params) for t in terms)
        self.token_level = any(t.spec.needs_token_stats(t.params) for t in terms)
        self.columns = tuple(sorted({c for t in terms for c in t.spec.needed_columns(t.params)}))
        self._checked = False
        if self.needs_reference and getattr(reference, "name", "none") == "none":
            names = [t.spec.name for t in terms if t.spec.needs_reference(t.params)]
            raise ConfigError(f"loss {', '.join(names)} needs a reference model, but none is configured")

    @classmethod
    def from_config(cls, loss_terms: list[LossTerm], reference) -> "Objective":
        names = [t.name for t in loss_terms]
        labels = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        return cls([Term.from_config(t, label) for t, label in zip(loss_terms, labels)], reference)

    @staticmethod
    def requirements(loss_terms: list[LossTerm]) -> tuple[bool, str]:
        """(needs a reference, which losses) — before any model is built."""
        needing = [t.name for t in loss_terms if get_spec(t.name).needs_reference(t.resolved_params())]
        return bool(needing), "loss " + ", ".join(needing) if needing else ""

    # ------------------------------------------------------------------ data layout
    @property
    def roles(self) -> tuple[str, ...]:
        roles = ("chosen", "rejected") if self.kind == "paired" else ("completion",)
        needs = set().union(*(t.spec.inputs for t in self.terms))
        if "policy_kl_logps" in needs:
            roles += ("kl",)
        if "ref_completion" in self.columns:
            roles += ("ref_completion",)
        return roles

    @property
    def extra_columns(self) -> tuple[str, ...]:
        """Numeric per-example columns the collator must put in the batch."""
        return tuple(c for c in self.columns if c != "ref_completion")

    # ------------------------------------------------------------------ normalisation
    def units(self, batch: Batch) -> list[float]:
        """Per term: how many units this batch holds (examples, or target tokens)."""
        return [float(self._target_tokens(batch)) if t.spec.normalize == "token" else float(batch.num_examples)
                for t in self.terms]

    def _target_tokens(self, batch: Batch) -> int:
        role = "chosen" if self.kind == "paired" else "completion"
        lengths = batch.sequence_lengths[batch.index[role]]
        if batch.labels is not None and self.kind != "paired":
            lengths = lengths[batch.labels.bool()]
        return int(lengths.sum())

    # ------------------------------------------------------------------ forward
    def forward(self, model, batch: Batch, units: list[float]) -> StepOutput:
        """Scores, inputs and every term's loss. ``units`` are the step's totals per term."""
        ref = None
        if self.needs_reference:
            ref = self.reference.scores(batch, keep_token_logprobs=self.token_level)
        policy = score_batch(model, batch,
                             ref_token_logprobs=ref.token_logprobs if ref is not None else None)
        if ref is not None:
            ref.token_logprobs = None  # (K, V): not needed past this point
        inputs = self.make_inputs(batch, policy, ref)
        if not self._checked:  # the first forward runs before any optimizer step
            for term in self.terms:
                check_inputs(term.spec, term.params, inputs.present(), self.kind == "paired")
            self._checked = True
        outputs = []
        loss = torch.zeros((), device=policy.logps.device)
        for term, unit in zip(self.terms, units):
            out = term.spec.fn(inputs, term.params)
            outputs.append(out)
            loss = loss + term.weight * out.losses.sum() / max(unit, 1.0)
        return StepOutput(loss, outputs, inputs, policy)

    def make_inputs(self, batch: Batch, policy: SequenceScores, ref: SequenceScores | None) -> LossInputs:
        def pick(scores: SequenceScores | None, role: str, attr: str = "logps"):
            if scores is None or role not in batch.index:
                return None
            values = getattr(scores, attr)
            return None if values is None else values[batch.index[role]]

        lengths = batch.sequence_lengths
        if self.kind == "paired":
            inputs = LossInputs(
                policy_chosen_logps=pick(policy, "chosen"), policy_rejected_logps=pick(policy, "rejected"),
                ref_chosen_logps=pick(ref, "chosen"), ref_rejected_logps=pick(ref, "rejected"),
                chosen_lengths=lengths[batch.index["chosen"]], rejected_lengths=lengths[batch.index["rejected"]],
                chosen_seq_kl=pick(policy, "chosen", "seq_kl"), rejected_seq_kl=pick(policy, "rejected", "seq_kl"))
        else:
            inputs = LossInputs(
                policy_logps=pick(policy, "completion"), ref_logps=pick(ref, "completion"),
                lengths=lengths[batch.index["completion"]], labels=batch.labels,
                policy_kl_logps=pick(policy, "kl"), ref_kl_logps=pick(ref, "kl"))
        inputs.extras = dict(batch.extras)
        if "ref_completion" in batch.index:
            inputs.extras["ref_completion_logps"] = pick(policy, "ref_completion")
            inputs.extras["ref_completion_lengths"] = lengths[batch.index["ref_completion"]]
        return inputs

    # ------------------------------------------------------------------ metrics
    def metrics(self, step: StepOutput, batch: Batch) -> dict[str, tuple[Tensor, float]]:
        """(sum, count) pairs for the accumulator; means are taken over the logging window."""
        out: dict[str, tuple[Tensor, float]] = {}
        for term, unit, result in zip(self.terms, self.units(batch), step.outputs):
            out[f"loss/{term.label}"] = (result.losses.detach().sum(), unit)
        inputs, pol = step.inputs, step.policy
        if self.kind == "paired":
            ci, ri = batch.index["chosen"], batch.index["rejected"]
            _mean(out, "logps/chosen", inputs.policy_chosen_logps)
            _mean(out, "logps/rejected", inputs.policy_rejected_logps)
            _mean(out, "logits/chosen", pol.logits_mean[ci])
            _mean(out, "logits/rejected", pol.logits_mean[ri])
        else:
            logps = inputs.policy_logps
            if batch.labels is None:
                _mean(out, "logps/completion", logps)
            else:
                _mean(out, "logps/chosen", logps[batch.labels.bool()])
                _mean(out, "logps/rejected", logps[~batch.labels.bool()])
        out["mean_token_accuracy"] = (pol.correct.sum(), float(pol.lengths.sum()))
        rewarded = next((r for r in step.outputs if r.chosen_rewards is not None), None)
        if rewarded is not None:
            _mean(out, "rewards/chosen", rewarded.chosen_rewards)
            _mean(out, "rewards/rejected", rewarded.rejected_rewards)
            if rewarded.chosen_rewards.shape == rewarded.rejected_rewards.shape and self.kind == "paired":
                diff = (rewarded.chosen_rewards - rewarded.rejected_rewards).detach()
                _mean(out, "rewards/accuracies", (diff > 0).float())
                _mean(out, "rewards/margins", diff)
        for result in step.outputs:
            for name, value in result.metrics.items():
                _mean(out, name, value)
        return out

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        """Add the weighted total ``loss``; per-term losses stay only when there are several."""
        means = dict(means)
        total = sum(t.weight * means[f"loss/{t.label}"] for t in self.terms)
        if len(self.terms) == 1:
            means.pop(f"loss/{self.terms[0].label}")
        return {"loss": total, **means}


def _mean(out: dict, name: str, values: Tensor) -> None:
    values = values.detach().float()
    out[name] = (values.sum(), float(values.numel()))
