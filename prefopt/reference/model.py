"""A separate, frozen reference model: loaded from a path, or a copy of the initial policy."""
from __future__ import annotations

import copy
from typing import Any

import torch

from prefopt.config import ModelConfig, ReferenceConfig
from prefopt.data.collate import Batch
from prefopt.errors import ConfigError
from prefopt.logps import Scoring, SequenceScores, score_batch


def zero3_inference_engine(accelerator, model: torch.nn.Module):
    """The reference under DeepSpeed ZeRO-3: loaded partitioned (``zero3_init_flag``), a model
    has no whole weight on any process and cannot run a forward by itself (``'weight' must be
    2-D``), so it runs in its own DeepSpeed engine with the training config's ZeRO-3 partitioning
    and no optimizer, which gathers each layer's weights for its forward."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


class ModelReference:
    name = "model"

    def __init__(self, model: torch.nn.Module, description: str):
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.description = description
        self.accelerator = None
        self.scoring: Scoring | None = None

    @classmethod
    def build(cls, cfg: ReferenceConfig, model_cfg: ModelConfig, *, policy: Any = None,
              ref_model: Any = None) -> "ModelReference":
        from prefopt.models import disable_dropout, load_model

        if isinstance(ref_model, torch.nn.Module):
            return cls(ref_model, f"given model ({type(ref_model).__name__})")
        path = ref_model if ref_model is not None else cfg.name_or_path
        if path is not None:
            dtype = cfg.dtype or model_cfg.dtype
            model = load_model(str(path), dtype=dtype, model_cfg=model_cfg)
            if model_cfg.disable_dropout:
                disable_dropout(model)
            return cls(model, f"loaded from {path}")
        # A copy of the initial policy, taken before any optimizer step.
        return cls(copy.deepcopy(policy), "frozen copy of the initial policy")

    def prepare(self, ctx) -> None:
        accelerator = ctx.accelerator
        state = accelerator.state
        sharded = getattr(state, "deepspeed_plugin", None) is not None and \
            getattr(state.deepspeed_plugin, "zero_stage", 0) == 3
        if sharded and self.description.startswith("frozen copy"):
            raise ConfigError("under DeepSpeed ZeRO-3 the policy is sharded and cannot be deep-copied as "
                              "the reference; set reference.name_or_path to the initial checkpoint")
        self.accelerator = accelerator
        if sharded:
            self.model = zero3_inference_engine(accelerator, self.model)
        elif accelerator.is_fsdp2:
            # accelerate's prepare_model(evaluation_mode=True) leaves a model whole under FSDP2 (a
            # full replica on every process, found running FSDP2 on CPU processes): shard the
            # reference with the plugin's own settings and wrap policy, as the policy is.
            from accelerate.utils import fsdp2_prepare_model
            self.model = fsdp2_prepare_model(accelerator, self.model)
            self.model.eval()
        else:
            self.model = accelerator.prepare_model(self.model, evaluation_mode=True)
        # accelerate saves every prepared model in a checkpoint; the frozen reference is not
        # training state (it is rebuilt from the config), so it must not be one of them.
        if self.model in accelerator._models:
            accelerator._models.remove(self.model)
        self.scoring = ctx.plan(self.model)

    @torch.no_grad()
    def scores(self, batch: Batch, keep_token_logprobs: bool = False) -> SequenceScores:
        ctx = self.accelerator.autocast() if self.accelerator is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            return score_batch(self.model, batch, self.scoring, keep_token_logprobs=keep_token_logprobs,
                                   details=False)

    def release(self) -> None:
        """Free the model (after a pre-pass has cached what it computes)."""
        self.model = None
