"""The LoRA policy's base model as the reference: the same model with its adapters disabled.

No second copy of the weights: each reference pass runs the policy under
``disable_adapter()``, without gradient. The base weights are frozen, so this is exactly the
initial policy, for the whole run and on resume.
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

    @torch.no_grad()
    def scores(self, batch: Batch, keep_token_logprobs: bool = False) -> SequenceScores:
        was_training = self.model.training
        self.model.eval()
        try:
            with unwrap_model(self.model).disable_adapter(), self.accelerator.autocast():
                return score_batch(self.model, batch, self.scoring, keep_token_logprobs=keep_token_logprobs)
        finally:
            self.model.train(was_training)

    def release(self) -> None:
        """Nothing to free: the reference is the policy itself."""
