"""The reference strategy interface and the factory that picks one from the config."""
from __future__ import annotations

import logging
from typing import Any, Protocol

from prefopt.config import ModelConfig, ReferenceConfig
from prefopt.data.collate import Batch
from prefopt.errors import ConfigError
from prefopt.logps import SequenceScores

log = logging.getLogger("prefopt")


class ReferenceStrategy(Protocol):
    name: str

    def prepare(self, accelerator) -> None:
        """Place the reference on the accelerator's device (once, before training)."""

    def scores(self, batch: Batch, keep_token_logprobs: bool = False) -> SequenceScores | None:
        """Reference statistics for every sequence of ``batch`` (no gradient)."""


def build_reference(cfg: ReferenceConfig, model_cfg: ModelConfig, *, needed: bool, needed_by: str,
                    policy: Any = None, ref_model: Any = None) -> ReferenceStrategy:
    """Choose and build the strategy. ``ref_model`` may be a model object or a path."""
    from prefopt.reference.model import ModelReference
    from prefopt.reference.none import NoReference

    strategy = cfg.strategy
    if strategy == "auto" or (strategy == "model" and not needed):
        if strategy == "model" and (ref_model is not None or cfg.name_or_path is not None):
            log.warning("a reference model is configured but no loss uses one; it is not loaded")
        strategy = "model" if needed else "none"
    if strategy == "none":
        if needed:
            raise ConfigError(f"{needed_by} needs a reference model, but reference.strategy is 'none'")
        return NoReference()
    if ref_model is None and cfg.name_or_path is None and policy is None:
        raise ConfigError("reference.strategy 'model' needs reference.name_or_path or a policy to copy")
    return ModelReference.build(cfg, model_cfg, policy=policy, ref_model=ref_model)
