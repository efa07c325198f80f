"""prefopt: preference optimisation for language models (SFT, DPO and its family).

Python API::

    from prefopt import DPOTrainer, DPOConfig
    trainer = DPOTrainer(model, ref_model, beta=0.1, train_dataset=ds, tokenizer=tokenizer,
                         args=DPOConfig(output_dir="out"))
    trainer.train()

Losses without a model: ``prefopt.losses.compute("dpo", policy_chosen_logps=..., ...)``.
"""
import logging as _logging

from prefopt import losses
from prefopt.config import RunConfig, load_config
from prefopt.errors import ConfigError, DataError, PrefoptError
from prefopt.configs import CPOConfig, DPOConfig, KTOConfig, ORPOConfig, RewardConfig, SFTConfig
from prefopt.trainer import (CPOTrainer, DPOTrainer, KTOTrainer, ORPOTrainer, RewardTrainer, SFTTrainer,
                             Trainer)

__version__ = "0.1.0"
__all__ = ["DPOConfig", "DPOTrainer", "KTOConfig", "KTOTrainer", "CPOConfig", "CPOTrainer", "ORPOConfig",
           "ORPOTrainer", "RewardConfig", "RewardTrainer", "SFTConfig", "SFTTrainer", "Trainer", "RunConfig",
           "load_config", "losses", "ConfigError", "DataError", "PrefoptError"]

_log = _logging.getLogger("prefopt")
if not _log.handlers:  # data counts and run summaries are part of the output, like transformers' logs
    _handler = _logging.StreamHandler()
    _handler.setFormatter(_logging.Formatter("[prefopt] %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(_logging.INFO)
    _log.propagate = False
