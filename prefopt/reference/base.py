"""The reference strategy interface, what a strategy gets at ``prepare``, and the factory.

A strategy is built from the config before the data is read (a frozen copy of the policy
must be taken before any optimizer step) and prepared after everything else is built, with
a ``ReferenceContext``: the prepared policy (an adapter-disabled LoRA reference scores with
it), the datasets and the run's collator (a pre-pass computes a cache from them), the
accelerator, and a function that settles how a reference model is scored (layout and head,
checked on a probe batch like the policy's). Each strategy checks its own incompatibilities
when it is built or prepared, before any training step.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prefopt.config import ModelConfig, ReferenceConfig
from prefopt.data.collate import Batch
from prefopt.errors import ConfigError
from prefopt.logps import Scoring, SequenceScores

log = logging.getLogger("prefopt")


@dataclass
class ReferenceContext:
    accelerator: Any
    policy: Any                                  # the prepared policy model
    collator: Any                                # the run's collator (its layout is settled)
    plan: Callable[[Any], Scoring]               # how to score a given reference model
    datasets: dict[str, list] = field(default_factory=dict)  # "train"/"eval": examples, roles expanded
    batch_size: int = 8                          # examples per batch of a pre-pass
    output_dir: Path = Path(".")
    token_level: bool = False                    # the objective needs (K, V) reference distributions
    probe: Any = None                            # prefopt.scoring.Probe: examples and tolerance for checks
    tokenizer: Any = None                        # the run's tokenizer (a VLM's holds its processor)


class ReferenceStrategy(Protocol):
    name: str
    description: str

    def prepare(self, ctx: ReferenceContext) -> None:
        """Everything the strategy needs before the first step (device placement, a cache)."""

    def scores(self, batch: Batch, keep_token_logprobs: bool = False) -> SequenceScores | None:
        """Reference statistics for every sequence of ``batch`` (no gradient)."""


def _synced(cfg: ReferenceConfig, model_cfg: ModelConfig, strategy: str, policy, ref_model):
    from prefopt.reference.model import ModelReference
    from prefopt.reference.synced import SyncedReference

    if strategy == "lora":
        raise ConfigError("reference.sync_steps (TR-DPO) cannot move a LoRA reference: it is the policy's own base "
                          "weights with the adapters disabled, so moving it would move the policy too. Use "
                          "reference.strategy=model (a separate copy) with LoRA, or no sync")
    if strategy == "precomputed":
        raise ConfigError("reference.sync_steps (TR-DPO) changes the reference during training, so log-probs "
                          "precomputed before it would be stale; use reference.strategy=model")
    return SyncedReference(ModelReference.build(cfg, model_cfg, policy=policy, ref_model=ref_model),
                           cfg.sync_steps, cfg.sync_alpha)


def reference_source(cfg: ReferenceConfig, ref_model: Any, policy: Any, needed: bool, policy_path: str | None):
    """``ref_model`` as given; under DeepSpeed ZeRO-3, where a partitioned policy cannot be copied,
    a policy loaded from a path has its initial weights loaded again from that path (what the
    reference copy would hold). Not when no loss needs a reference, one is given, or the strategy
    does not copy the policy (a LoRA policy's reference is its own base)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from prefopt.lora import is_peft_model

    if not needed or ref_model is not None or cfg.name_or_path is not None or cfg.strategy in ("lora", "none") \
            or is_peft_model(policy) or not is_deepspeed_zero3_enabled():
        return ref_model
    return policy_path


def build_reference(cfg: ReferenceConfig, model_cfg: ModelConfig, *, needed: bool, needed_by: str,
                    policy: Any = None, ref_model: Any = None) -> ReferenceStrategy:
    """Choose and build the strategy. ``ref_model`` may be a model object or a path."""
    from prefopt.lora import is_peft_model
    from prefopt.reference.lora import LoraReference
    from prefopt.reference.model import ModelReference
    from prefopt.reference.none import NoReference
    from prefopt.reference.precomputed import PrecomputedReference

    strategy = cfg.strategy
    separate = ref_model is not None or cfg.name_or_path is not None
    if not needed and strategy != "none":
        if strategy != "auto" or separate:
            log.warning("reference.strategy=%s is configured but no loss uses a reference; none is built", strategy)
        strategy = "none"
    if strategy == "none":
        if needed:
            raise ConfigError(f"{needed_by} needs a reference model, but reference.strategy is 'none'")
        return NoReference()
    lora = is_peft_model(policy)
    if strategy == "lora" and separate:
        raise ConfigError("reference.strategy=lora uses the policy's base model; a separate reference model "
                          "(reference.name_or_path / ref_model) needs reference.strategy=model")
    if strategy == "auto":
        strategy = "lora" if lora and not separate else "model"
    if cfg.sync_steps:
        return _synced(cfg, model_cfg, strategy, policy, ref_model)
    if strategy == "precomputed":
        source = LoraReference() if lora and not separate else \
            ModelReference.build(cfg, model_cfg, policy=policy, ref_model=ref_model)
        return PrecomputedReference(source, cfg.cache_dir)
    if strategy == "lora":
        return LoraReference()
    return ModelReference.build(cfg, model_cfg, policy=policy, ref_model=ref_model)
