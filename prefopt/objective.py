"""The objective: one or more registered losses, weighted, over one reference strategy.

The objective is the single place that knows how a Batch becomes LossInputs:

    batch ──score_batch(policy)──▶ SequenceScores ─┐
    batch ──reference.scores────▶ SequenceScores ─┴─▶ LossInputs ──terms──▶ LossOutputs

It reads the registry flags of its terms to decide which data kind it consumes
(paired / unpaired / completion), which roles every example must carry (prefopt.data.roles),
whether the reference runs and whether token-level statistics are needed, and how each term's
per-example losses are normalised. Registered term modifiers (prefopt.losses.modifiers: LD-DPO,
WPO) and extra loss terms given as Python callables are applied here too, through their hooks.
The training loop only calls ``units``, ``forward``, ``metrics`` and ``summarize``.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from prefopt.config import LossTerm, parse_loss
from prefopt.data.collate import Batch
from prefopt.data.tokenize import response_roles
from prefopt.errors import ConfigError, PrefoptError
from prefopt.logps import Scoring, SequenceScores, score_batch
from prefopt.losses import LossInputs, LossOutput, LossSpec, check_inputs, get_spec
from prefopt.losses.listwise import metrics as listwise_metrics
from prefopt.losses.modifiers import MODIFIERS, ModifierContext

Tensor = torch.Tensor
ExtraLoss = Callable[["StepOutput"], Tensor]


@dataclass
class Term:
    spec: LossSpec
    params: Any
    weight: float
    label: str                      # metric name suffix: loss/<label>
    modifiers: dict[str, Any] = field(default_factory=dict)  # active modifiers by key, with their values
    state: dict = field(default_factory=dict)  # a stateful loss's running statistics

    @classmethod
    def from_config(cls, term: LossTerm, label: str) -> "Term":
        return cls(get_spec(term.name), term.resolved_params(), term.weight, label, dict(term.modifiers))


@dataclass
class StepOutput:
    """What one micro-batch produced; extra loss callables receive this."""
    loss: Tensor                     # scalar: Σ_k w_k Σ_i losses_k[i] / units_k + Σ extras / micro-batches
    outputs: dict[str, LossOutput]   # by term label
    inputs: LossInputs
    policy: SequenceScores
    batch: Batch
    extras: dict[str, Tensor] = field(default_factory=dict)  # value of each extra loss term


class Objective:
    def __init__(self, terms: list[Term], reference, extra_losses: dict[str, ExtraLoss] | None = None):
        if not terms:
            raise ConfigError("the objective needs at least one loss")
        kinds = {t.spec.data for t in terms} - {"any"}
        if len(kinds) > 1:
            raise ConfigError("cannot mix paired and unpaired losses in one objective: "
                              + ", ".join(f"{t.spec.name} ({t.spec.data})" for t in terms))
        if kinds == {"listwise"} and any(t.spec.data != "listwise" for t in terms):
            raise ConfigError("a listwise objective takes listwise losses only (K responses per example); "
                              + ", ".join(f"{t.spec.name} ({t.spec.data})" for t in terms if t.spec.data != "listwise")
                              + " cannot be added to it")
        score_kinds = {t.spec.scores for t in terms}
        if len(score_kinds) > 1:
            raise ConfigError("cannot mix a reward-model loss with log-prob losses in one objective: "
                              + ", ".join(f"{t.spec.name} ({t.spec.scores})" for t in terms))
        self.rewards = score_kinds == {"reward"}  # the model is a reward model: one scalar per sequence
        self.terms = terms
        self.kind = {"paired": "paired", "unpaired": "unpaired", "listwise": "listwise"}.get(next(iter(kinds), ""),
                                                                                        "completion")
        self.reference = reference
        self.extra_losses = dict(extra_losses or {})
        clash = set(self.extra_losses) & {t.label for t in terms}
        if clash:
            raise ConfigError(f"extra loss name(s) {sorted(clash)} collide with loss terms")
        self.needs_reference = any(t.spec.needs_reference(t.params) for t in terms)
        self.token_level = any(t.spec.needs_token_stats(t.params) for t in terms)
        self.token_stats = tuple(sorted({s for t in terms for m in t.modifiers for s in MODIFIERS[m].token_stats}))
        self.scoring: Scoring | None = None  # how the policy is scored; set by the trainer at setup
        self.columns = tuple(sorted({c for t in terms for c in t.spec.needed_columns(t.params)}))
        self._checked = False
        self.reduce_mean = None  # set by the trainer when several processes train together
        if self.needs_reference and getattr(reference, "name", "none") == "none":
            names = [t.spec.name for t in terms if t.spec.needs_reference(t.params)]
            raise ConfigError(f"loss {', '.join(names)} needs a reference model, but none is configured")

    @classmethod
    def from_config(cls, loss_terms: list[LossTerm], reference,
                    extra_losses: dict[str, ExtraLoss] | None = None) -> "Objective":
        loss_terms = parse_loss(loss_terms)  # LossTerms built by hand get the config's checks too
        names = [t.name for t in loss_terms]
        labels = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        return cls([Term.from_config(t, label) for t, label in zip(loss_terms, labels)], reference, extra_losses)

    @staticmethod
    def requirements(loss_terms: list[LossTerm]) -> tuple[bool, str]:
        """(needs a reference, which losses) — before any model is built."""
        needing = [t.name for t in loss_terms if get_spec(t.name).needs_reference(t.resolved_params())]
        return bool(needing), "loss " + ", ".join(needing) if needing else ""

    # ------------------------------------------------------------------ data layout
    @property
    def roles(self) -> tuple[str, ...]:
        if self.kind == "listwise":  # K responses, best first: as many as the losses take
            return response_roles(max(t.params.max_responses for t in self.terms))
        roles = ("chosen", "rejected") if self.kind == "paired" else ("completion",)
        needs = set().union(*(t.spec.extra_inputs(t.params) for t in self.terms))
        if "policy_kl_logps" in needs:
            roles += ("kl",)
        if "policy_ref_completion_logps" in needs:
            roles += ("ref_completion",)
        return roles

    @property
    def optional_columns(self) -> tuple[str, ...]:
        """Columns a loss uses when present (SLiC's ref_completion falls back to the chosen)."""
        if self.kind == "listwise":  # a pair with scores is a scored list of two
            return ("score_chosen", "score_rejected")
        return ("ref_completion",) if "ref_completion" in self.roles else ()

    @property
    def record_checks(self) -> tuple:
        """Per-record column checks of the terms' losses, for the data pipeline."""
        return tuple(functools.partial(t.spec.record_check, p=t.params) for t in self.terms
                     if t.spec.record_check is not None)

    @property
    def extra_columns(self) -> tuple[str, ...]:
        """Numeric per-example columns the collator must put in the batch."""
        return tuple(c for c in self.columns if c != "ref_completion")

    # ------------------------------------------------------------------ normalisation
    def units(self, batch: Batch) -> dict[str, float]:
        """How many units this batch holds, per term (examples or target tokens) and per
        extra loss (one micro-batch). The loop sums these over the optimizer step."""
        units = {t.label: float(self._target_tokens(batch)) if t.spec.normalize == "token"
                 else float(batch.num_examples) for t in self.terms}
        units.update({name: 1.0 for name in self.extra_losses})
        return units

    @property
    def target_role(self) -> str:
        """The role of the completions the model should produce (the best response of a list)."""
        return {"paired": "chosen", "listwise": "response_0"}.get(self.kind, "completion")

    def _target_tokens(self, batch: Batch) -> int:
        role = self.target_role
        lengths = batch.sequence_lengths[batch.index[role]]
        if batch.labels is not None and self.kind != "paired":
            lengths = lengths[batch.labels.bool()]
        return int(lengths.sum())

    # ------------------------------------------------------------------ forward
    def forward(self, model, batch: Batch, units: dict[str, float], training: bool = True) -> StepOutput:
        """Scores, inputs and every term's loss. ``units`` are the step's totals.

        With ``training=False`` stateful losses read their state without updating it.
        """
        ref = None
        if self.needs_reference:
            ref = self.reference.scores(batch, keep_token_logprobs=self.token_level)
        policy = score_batch(model, batch, self.scoring, token_stats=self.token_stats,
                             ref_token_logprobs=ref.token_logprobs if ref is not None else None)
        if ref is not None:
            ref.token_logprobs = None  # (K, V): not needed past this point
        inputs = self.make_inputs(batch, policy, ref)
        if not self._checked:  # the first forward runs before any optimizer step
            self._check(inputs)
        loss = torch.zeros((), device=policy.logps.device)
        outputs = {}
        for term in self.terms:
            out = self._run_term(term, batch, inputs, policy, ref, training)
            outputs[term.label] = out
            loss = loss + term.weight * out.losses.sum() / max(units[term.label], 1.0)
        step = StepOutput(loss, outputs, inputs, policy, batch)
        for name, fn in self.extra_losses.items():
            value = fn(step)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise PrefoptError(f"extra loss '{name}' must return a scalar tensor, got {value!r:.80}")
            step.extras[name] = value.reshape(())
            step.loss = step.loss + step.extras[name] / max(units[name], 1.0)
        return step

    def _run_term(self, term: Term, batch: Batch, inputs: LossInputs, policy: SequenceScores,
                  ref: SequenceScores | None, training: bool) -> LossOutput:
        inputs = dataclasses.replace(inputs, state=term.state if training else copy.deepcopy(term.state),
                                     reduce_mean=self.reduce_mean)
        ctx = ModifierContext(batch, policy, ref)
        for key, value in term.modifiers.items():
            if MODIFIERS[key].adjust_inputs is not None:
                inputs = MODIFIERS[key].adjust_inputs(inputs, ctx, value)
        out = term.spec.fn(inputs, term.params)
        for key, value in term.modifiers.items():
            if MODIFIERS[key].adjust_output is not None:
                out = MODIFIERS[key].adjust_output(out, ctx, value)
        return out

    def make_inputs(self, batch: Batch, policy: SequenceScores, ref: SequenceScores | None) -> LossInputs:
        def pick(scores: SequenceScores | None, role: str, attr: str = "logps"):
            if scores is None or role not in batch.index:
                return None
            values = getattr(scores, attr)
            return None if values is None else values[batch.index[role]]

        lengths = batch.sequence_lengths
        if self.kind == "listwise":  # (B, K): the k-th best response of every example
            rows = torch.stack([batch.index[role] for role in self.roles], 1)
            inputs = LossInputs(
                policy_response_logps=policy.logps[rows], ref_response_logps=None if ref is None else ref.logps[rows],
                response_lengths=lengths[rows], response_scores=batch.response_scores,
                response_mask=batch.response_mask)
        elif self.kind == "paired":
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
        if "ref_completion" in batch.index:
            inputs.policy_ref_completion_logps = pick(policy, "ref_completion")
            inputs.ref_completion_lengths = lengths[batch.index["ref_completion"]]
        inputs.extras = dict(batch.extras)
        return inputs

    def _check(self, inputs: LossInputs) -> None:
        for term in self.terms:
            check_inputs(term.spec, term.params, inputs.present(), self.kind == "paired")
        self._checked = True

    def preflight(self, batch: Batch) -> None:
        """Run every term on placeholder scores for ``batch`` (no model): a missing column,
        role or capability, or a batch a loss cannot use, fails here, before training starts."""
        n, k = batch.num_sequences, len(batch.token_sequence)

        def fake(token_level: bool) -> SequenceScores:
            return SequenceScores(torch.zeros(n), batch.sequence_lengths, torch.zeros(n), torch.zeros(n),
                                  token_logps=torch.zeros(k), seq_kl=torch.zeros(n) if token_level else None,
                                  stats={name: torch.zeros(n) for name in self.token_stats})

        policy = fake(self.token_level)
        ref = fake(False) if self.needs_reference else None
        inputs = self.make_inputs(batch, policy, ref)
        self._check(inputs)
        for term in self.terms:
            try:
                self._run_term(term, batch, inputs, policy, ref, training=False)
            except (ValueError, RuntimeError) as e:
                raise ConfigError(f"loss '{term.spec.name}' cannot run on this data: {e}") from None

    # ------------------------------------------------------------------ checkpointed state
    def state_dict(self) -> dict:
        return {t.label: copy.deepcopy(t.state) for t in self.terms}

    def load_state_dict(self, state: dict) -> None:
        for t in self.terms:
            t.state.clear()
            t.state.update(state.get(t.label, {}))

    @property
    def stateful(self) -> bool:
        return any(t.spec.stateful for t in self.terms)

    # ------------------------------------------------------------------ metrics
    def metrics(self, step: StepOutput, batch: Batch) -> dict[str, tuple[Tensor, float]]:
        """(sum, count) pairs for the accumulator; means are taken over the logging window."""
        out: dict[str, tuple[Tensor, float]] = {}
        units = self.units(batch)
        for term in self.terms:
            out[f"loss/{term.label}"] = (step.outputs[term.label].losses.detach().sum(), units[term.label])
        for name, value in step.extras.items():
            out[f"loss/{name}"] = (value.detach(), 1.0)
        inputs, pol = step.inputs, step.policy
        lengths = batch.sequence_lengths.to(pol.logits_mean.dtype)
        if self.rewards:  # no log-probs, logits or token accuracy: the rewards below are the metrics
            pass
        elif self.kind == "listwise":
            logps, mask = inputs.policy_response_logps, inputs.response_mask
            _mean(out, "logps/chosen", logps[:, 0])
            _mean(out, "logps/rejected", logps[:, 1:][mask[:, 1:]])
        elif self.kind == "paired":
            ci, ri = batch.index["chosen"], batch.index["rejected"]
            _mean(out, "logps/chosen", inputs.policy_chosen_logps)
            _mean(out, "logps/rejected", inputs.policy_rejected_logps)
            # token means over the step (TRL's definition), not a mean of per-sequence means
            out["logits/chosen"] = ((pol.logits_mean[ci] * lengths[ci]).sum(), float(lengths[ci].sum()))
            out["logits/rejected"] = ((pol.logits_mean[ri] * lengths[ri]).sum(), float(lengths[ri].sum()))
        else:
            logps = inputs.policy_logps
            if batch.labels is None:
                _mean(out, "logps/completion", logps)
            else:
                _mean(out, "logps/chosen", logps[batch.labels.bool()])
                _mean(out, "logps/rejected", logps[~batch.labels.bool()])
        target = batch.index[self.target_role]
        if batch.labels is not None and self.kind != "paired":
            target = target[batch.labels.bool()]
        # on the completions the model should produce (not rejected, mismatched or y_ref rows)
        if not self.rewards:
            out["mean_token_accuracy"] = (pol.correct[target].sum(), float(lengths[target].sum()))
        rewarded = next((r for r in step.outputs.values() if r.chosen_rewards is not None), None)
        if rewarded is not None:
            _mean(out, "rewards/chosen", rewarded.chosen_rewards)
            _mean(out, "rewards/rejected", rewarded.rejected_rewards)
            if self.kind in ("paired", "listwise"):
                diff = (rewarded.chosen_rewards - rewarded.rejected_rewards).detach()
                _mean(out, "rewards/accuracies", (diff > 0).float())
                _mean(out, "rewards/margins", diff)
            if rewarded.response_rewards is not None:  # accuracies: the share of ordered pairs ranked right
                out.update(listwise_metrics(rewarded.response_rewards, inputs.response_scores, inputs.response_mask))
        for result in step.outputs.values():
            for name, value in result.metrics.items():
                _mean(out, name, value)
        return out

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        """Add the weighted total ``loss``; per-term losses stay only when there are several."""
        means = dict(means)
        total = sum(t.weight * means[f"loss/{t.label}"] for t in self.terms)
        total += sum(means[f"loss/{name}"] for name in self.extra_losses)
        if len(self.terms) == 1 and not self.extra_losses:
            means.pop(f"loss/{self.terms[0].label}")
        return {"loss": total, **means}


def _mean(out: dict, name: str, values: Tensor) -> None:
    values = values.detach().float()
    out[name] = (values.sum(), float(values.numel()))
