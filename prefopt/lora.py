"""LoRA and QLoRA through peft: adapters on the policy, the base model as the reference.

``model.lora`` (YAML) or ``peft_config=LoraConfig(...)`` (Python, TRL's argument) wraps the
policy with ``peft.get_peft_model``; a ``PeftModel`` passed in is used as it is. The
reference is then the same model with its adapters disabled (prefopt.reference.lora): no
second copy in memory. ``model.load_in_4bit`` loads the base in 4-bit NF4 with bfloat16
compute (bitsandbytes, CUDA only) and prepares it for k-bit training (QLoRA, Dettmers et
al. 2023).

Single-process and DDP checkpoints leave out the frozen base (FSDP and DeepSpeed save through
their own code); the final model is the adapter (loads with ``PeftModel.from_pretrained``) or, with
``save.merge_lora``, the merged weights (loads with ``AutoModelForCausalLM``).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from prefopt.errors import ConfigError, unknown

# Short YAML names (rank, alpha, dropout) for the usual LoraConfig fields; every other LoraConfig field works by its own name.
SHORT_NAMES = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}
DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear",
            "task_type": "CAUSAL_LM"}


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA needs the peft package: pip install 'prefopt[lora]'") from None
    return peft


def lora_config(spec: Any):
    """A ``peft.LoraConfig`` from a LoraConfig or a mapping (short names ``alpha``/``dropout``
    accepted); unknown keys are errors naming the closest valid one."""
    peft = _peft()
    if isinstance(spec, peft.LoraConfig):
        return spec
    if not isinstance(spec, dict):
        raise ConfigError(f"model.lora: expected a mapping of LoraConfig fields, got {spec!r}")
    valid = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    values = dict(DEFAULTS)
    for key, value in spec.items():
        name = SHORT_NAMES.get(key, key)
        if name not in valid:
            raise ConfigError("model.lora: " + unknown("LoRA option", key, sorted(valid | set(SHORT_NAMES))))
        values[name] = value
    try:
        return peft.LoraConfig(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.lora: {e}") from None


def lora_dict(config) -> dict:
    """A LoraConfig as the mapping ``lora_config`` turns back into the same LoraConfig (for the saved
    run config): prefopt's defaults always written, other fields where they differ from peft's."""
    peft = _peft()
    default = peft.LoraConfig()
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in ("peft_type", "task_type", "base_model_name_or_path", "revision", "peft_version") or \
                (f.name not in DEFAULTS and value == getattr(default, f.name)):
            continue
        out[f.name] = sorted(value) if isinstance(value, set) else value
    return out


def apply_lora(model, spec: Any, *, quantized: bool, gradient_checkpointing: bool, task_type: str = "CAUSAL_LM",
               train_vision: bool = False):
    """Wrap ``model`` with LoRA adapters (only they train). ``task_type="SEQ_CLS"`` (a reward
    model): peft then trains and saves the new score head whole (``modules_to_save``), which
    a LoRA-only reward model would leave at its random initialisation. A vision-language model
    gets adapters on its language model only (``all-linear`` or a list of names, restricted to
    the language model; a regex string is taken as written), unless ``train_vision``: then the
    targets apply everywhere, so ``all-linear`` adapts the vision tower's and projector's linear
    layers too (their base weights stay frozen, like the language model's) (prefopt.vlm)."""
    peft = _peft()
    if quantized:  # casts norms to fp32, enables input grads for checkpointing (QLoRA recipe)
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    config = lora_config(spec)
    from prefopt.vlm import is_vlm, language_lora_targets
    targets = config.target_modules
    if not train_vision and is_vlm(model) and (targets == "all-linear" or isinstance(targets, (list, set, tuple))):
        # a list of names would match the vision tower's layers of the same names too; a regex the
        # user wrote is taken as written
        config = dataclasses.replace(config, target_modules=language_lora_targets(
            model, None if targets == "all-linear" else set(targets)))
    if config.task_type != task_type:
        config = dataclasses.replace(config, task_type=task_type)
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules not found in the model
        raise ConfigError(f"model.lora: {str(e).splitlines()[0]} (target_modules={config.target_modules!r})") from None


def quantization_config(load_in_4bit: bool):
    """bitsandbytes 4-bit NF4 with bf16 compute and double quantisation; checked before loading."""
    if not load_in_4bit:
        return None
    if not torch.cuda.is_available():
        raise ConfigError("model.load_in_4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels do not run "
                          "on this machine's CPU. Train LoRA in full precision instead (model.lora, "
                          "model.load_in_4bit: false)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("model.load_in_4bit needs bitsandbytes: pip install 'prefopt[qlora]'") from None
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def merged_copy(model):
    """The adapters merged into a copy of the base model (the training model is left as it is).
    Under FSDP/DeepSpeed the local module is a shard: the trainer refuses merge_lora there."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model.get_base_model(), "is_loaded_in_4bit", False):
        raise ConfigError("save.merge_lora: the base model is 4-bit quantised; merging into it would round the "
                          "merged weights to 4 bits. Save the adapter (save.merge_lora: false), then load the base in "
                          "bfloat16 with PeftModel.from_pretrained(base, adapter) and call merge_and_unload()")
    return copy.deepcopy(model).merge_and_unload()


def bare_name(name: str) -> str:
    """A parameter name without DDP's ``module.`` prefix (a state dict may or may not carry it)."""
    return name.removeprefix("module.")


CHECKPOINT_ALL = "_prefopt_checkpoint_all"


def without_frozen_weights(models, weights, output_dir) -> None:
    """An ``accelerator.save_state`` pre-hook: a checkpoint leaves out frozen parameters (a LoRA
    base), which the config rebuilds; trainable parameters and buffers stay. Under FSDP and
    DeepSpeed accelerate saves through their own code and ``weights`` is empty. A model marked
    ``CHECKPOINT_ALL`` (TR-DPO's moving reference: frozen to the optimizer, but training state)
    is saved whole."""
    from accelerate.utils import extract_model_from_parallel

    for i, weight in enumerate(weights):
        if getattr(extract_model_from_parallel(models[i]), CHECKPOINT_ALL, False):
            continue
        frozen = {bare_name(n) for n, p in models[i].named_parameters() if not p.requires_grad}
        if frozen:
            weights[i] = {k: v for k, v in weight.items() if bare_name(k) not in frozen}
