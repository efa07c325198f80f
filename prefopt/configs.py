"""The Python API's configs: ``DPOConfig(output_dir="out", learning_rate=5e-7, beta=0.1, ...)``.

Each is a RunConfig built from flat keyword arguments: prefopt's own flat names
(prefopt.config_flat), sections (``data={...}``), dotted keys (``**{"data.max_length": 512}``),
and TRL's field names (prefopt.trl_compat: mapped, or refused with the reason). The same
names read back (``args.learning_rate``, ``args.bf16``, ``args.loss_type``) and can be set
(``args.gradient_checkpointing = True``), as on TRL's configs.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from prefopt.config import RunConfig, to_dict
from prefopt.config_flat import config_from_flat
from prefopt.trl_compat import FIELDS, is_trl_field, translate

# TRL names whose value is read back from the config (not from what was passed).
READBACK = {
    "bf16": lambda c: c.train.mixed_precision == "bf16" or (c.train.mixed_precision == "auto" and _auto_bf16()),
    "fp16": lambda c: c.train.mixed_precision == "fp16",
    "disable_tqdm": lambda c: not c.train.progress_bar,
    "precompute_ref_log_probs": lambda c: c.reference.strategy == "precomputed",
    "padding_free": lambda c: c.data.layout == "packed",
    "packing": lambda c: c.data.layout == "packed",
    "sync_ref_model": lambda c: c.reference.sync_steps > 0,
    "ref_model_sync_steps": lambda c: c.reference.sync_steps or 512,
    "ref_model_mixup_alpha": lambda c: c.reference.sync_alpha if c.reference.sync_steps else 0.6,
    "dataset_num_proc": lambda c: c.data.num_proc,
    "loss_weights": lambda c: [t.weight for t in c.loss],
}


def _auto_bf16() -> bool:
    from prefopt.trainer import resolve_precision

    return resolve_precision("auto") == "bf16"


def trl_readback(config: RunConfig, name: str) -> tuple | None:
    """(value,) of a TRL field name on ``config``: derived from the config (READBACK), as it was
    passed (DPOConfig keeps TRL fields prefopt has no key for), or TRL's default; None if unknown."""
    if name in READBACK:
        return (READBACK[name](config),)
    passed = config.__dict__.get("_trl", {})
    if name in passed:
        return (passed[name],)
    return (FIELDS[name].default,) if name in FIELDS else None


class DPOConfig(RunConfig):
    """Flat TRL-style keywords -> the nested RunConfig; the loss defaults to ``dpo``."""
    defaults: dict = {"loss": "dpo"}
    trl_kind = "dpo"

    def __init__(self, **kwargs):
        self._rebuild(self.defaults, kwargs)

    def _rebuild(self, base: dict, kwargs: dict) -> None:
        built = config_from_flat(base, translate(kwargs, self.trl_kind, _loss_name(base), existing=base))
        for f in fields(RunConfig):
            object.__setattr__(self, f.name, getattr(built, f.name))
        passed = {k: v for k, v in kwargs.items() if is_trl_field(k)}
        object.__setattr__(self, "_trl", {**self.__dict__.get("_trl", {}), **passed})

    def __setattr__(self, name: str, value: Any) -> None:
        """``args.learning_rate = 1e-5`` (any flat or TRL name) rebuilds the config with it."""
        if name in {f.name for f in fields(RunConfig)} or name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            self._rebuild(to_dict(self), {name: value})


def _loss_name(base: dict) -> str:
    loss = base.get("loss", "dpo")
    loss = loss[0] if isinstance(loss, list) else loss
    return loss if isinstance(loss, str) else loss.get("name", "dpo") if isinstance(loss, dict) else loss.name


class SFTConfig(DPOConfig):
    """The ``sft`` loss, and an SFT learning rate (2e-5) by default."""
    defaults = {"loss": "sft", "train": {"learning_rate": 2e-5}}
    trl_kind = "sft"


class RewardConfig(DPOConfig):
    """The ``bradley_terry`` loss (a reward model), learning rate 1e-5 by default."""
    defaults = {"loss": "bradley_terry", "train": {"learning_rate": 1e-5}}
    trl_kind = "reward"


class KTOConfig(DPOConfig):
    """The ``kto`` loss (unpaired data with a label)."""
    defaults = {"loss": "kto"}
    trl_kind = "kto"


class CPOConfig(DPOConfig):
    """The ``cpo`` loss (no reference); loss_type 'simpo' is SimPO, as in TRL's CPOConfig."""
    defaults = {"loss": "cpo"}
    trl_kind = "cpo"


class ORPOConfig(DPOConfig):
    """The ``orpo`` loss (no reference); beta is ORPO's λ, as in TRL."""
    defaults = {"loss": "orpo"}
    trl_kind = "orpo"
