"""The LoRA policy's base model as the reference: the same model with its adapters disabled.

No second copy of the weights: each reference pass runs the policy under
``disable_adapter()``, without gradient. The base weights are frozen, so when the adapters
start as a no-op (LoRA's B = 0) this is exactly the initial policy, for the whole run and on
resume. A policy whose adapters already change its outputs at the start (a LoRA-SFT model
passed in, or an initialisation that moves the base: PiSSA, OLoRA, LoftQ) has another initial
policy than its base: ``prepare`` checks this on the probe examples and refuses.
"""
from __future__ import annotations

import torch

from prefopt.data.collate import Batch
from prefopt.errors import ConfigError
from prefopt.lora import is_peft_model
from prefopt.logps import Scoring, SequenceScores, score_batch, unwrap_model


class LoraReference:
    name = "lora"
    description = "the policy's base model (LoRA adapters disabled)"

    def __init__(self):
        self.model = None
        self.accelerator = None
        self.scoring: Scoring | None = None

    def prepare(self, ctx) -> None:
        if not is_peft_model(unwrap_model(ctx.policy)):
            raise ConfigError("reference.strategy=lora needs a LoRA policy (model.lora, peft_config=, or a "
                              "PeftModel); use reference.strategy=model for a separate reference model")
        self.model, self.accelerator = ctx.policy, ctx.accelerator
        with unwrap_model(self.model).disable_adapter():
            self.scoring = ctx.plan(self.model)
        if ctx.probe is not None and ctx.probe.examples:
            self._check_adapters_start_as_no_op(ctx)

    def _check_adapters_start_as_no_op(self, ctx) -> None:
        batch = ctx.collator(ctx.probe.examples).to(ctx.accelerator.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                policy = score_batch(self.model, batch, self.scoring).token_logps
        finally:
            self.model.train(was_training)
        worst = float((policy - self.scores(batch).token_logps).abs().max())
        if worst > ctx.probe.tolerance(self.scoring.dtype):
            raise ConfigError(
                f"reference.strategy=lora: the policy's LoRA adapters already change its log-probs (by up to "
                f"{worst:.2g} per token) before training, so its base model is not the initial policy (a trained "
                f"adapter passed in, or an initialisation such as PiSSA/OLoRA/LoftQ that moves the base). Use "
                f"reference.strategy=model (a frozen copy of the policy as given) or merge the adapter first")

    @torch.no_grad()
    def scores(self, batch: Batch, keep_token_logprobs: bool = False) -> SequenceScores:
        was_training = self.model.training
        self.model.eval()
        try:
            with unwrap_model(self.model).disable_adapter(), self.accelerator.autocast():
                return score_batch(self.model, batch, self.scoring, keep_token_logprobs=keep_token_logprobs,
                                   details=False)
        finally:
            self.model.train(was_training)

    def release(self) -> None:
        """Nothing to free: the reference is the policy itself."""
