"""The table of TRL's config fields on prefopt (prefopt.trl_compat translates with it): every field of TRL 1.16's DPOConfig (with transformers'
TrainingArguments), KTOConfig, CPOConfig, ORPOConfig, RewardConfig and SFTConfig, and the
names older TRL releases used, either mapped onto a prefopt key or refused with what prefopt
does instead. ``DPOConfig(**kwargs)`` and the CLI's flat flags go through ``translate``.

A field passed at TRL's default value is always accepted (a script that spells out TRL's
defaults runs); a field that is not passed takes prefopt's default (the README's table lists
where the two differ). Fields without an effect on results (data-loader workers, log levels)
are accepted and logged once when set; a field whose effect prefopt does not reproduce is
refused with the reason, never ignored.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefopt.errors import ConfigError

log = logging.getLogger("prefopt")

ACCELERATE = ("set in the accelerate config and launch with `accelerate launch --config_file "
              "configs/accelerate/<ddp|fsdp2|zero2|zero3>.yaml -m prefopt ...` (README, 'Several processes')")
NO_EFFECT_LOADER = "batches are collated in the training process from tokenised examples held in memory"


@dataclass(frozen=True)
class Rule:
    default: Any                                  # TRL 1.16's default
    to: str | None = None                         # the prefopt key (flat name or dotted) taking the value
    convert: Callable[[Any], dict] | None = None  # value -> {prefopt name: value}; may raise ConfigError
    refuse: str | None = None                     # a value other than the default is refused: why, what instead
    ignore: str | None = None                     # accepted without effect: why (logged when set)


def M(default, to, convert=None):
    return Rule(default, to=to, convert=convert)


def C(default, convert):
    return Rule(default, convert=convert)


def R(default, why):
    return Rule(default, refuse=why)


def I(default, why):  # noqa: E743 -- "ignored", next to M, C and R
    return Rule(default, ignore=why)


def _unless_none(key: str, fn: Callable = lambda v: v):
    return lambda v: {} if v is None else {key: fn(v)}


def _warmup(value) -> dict:
    """transformers 5: a float below 1 is a ratio of the total steps."""
    return {"warmup_ratio": float(value)} if isinstance(value, float) and 0 < value < 1 else {"warmup_steps": int(value)}


def _every(key: str):
    def convert(value):
        if value is None:
            return {}
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key}={value}: a fraction of the total steps is not supported; give a number of steps")
        return {key: int(value)}
    return convert


def _strategy(key: str, allowed: tuple, drop: bool = False):
    def convert(value):
        value = getattr(value, "value", value)  # transformers' IntervalStrategy enum
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: prefopt supports {', '.join(allowed)}")
        return {} if drop else {key: value}
    return convert


def _optim(value) -> dict:
    value = getattr(value, "value", value)
    if str(value).startswith("adamw_torch") or value in ("adamw_hf", "adamw"):
        return {}
    raise ConfigError(f"optim={value!r}: prefopt trains with torch.optim.AdamW (no weight decay on biases and "
                      "norms): set learning_rate, weight_decay, adam_beta1/2, adam_epsilon; another optimizer "
                      "object can be passed as optimizers=(optimizer, scheduler)")


def _checkpointing_kwargs(value) -> dict:
    if value in (None, {}) or value == {"use_reentrant": False}:
        return {}
    raise ConfigError(f"gradient_checkpointing_kwargs={value!r}: prefopt checkpoints activations non-reentrantly "
                      "(use_reentrant=False), the only setting that works with LoRA and frozen inputs")


def _model_init_kwargs(value) -> dict:
    if not value:
        return {}
    out, keys = {}, {"dtype": "dtype", "torch_dtype": "dtype", "attn_implementation": "attn_implementation",
                     "trust_remote_code": "trust_remote_code"}
    for key, item in dict(value).items():
        if key not in keys:
            raise ConfigError(f"model_init_kwargs: '{key}' is not supported; prefopt passes model.dtype, "
                              "model.attn_implementation and model.trust_remote_code to from_pretrained "
                              "(devices come from accelerate, 4-bit loading from model.load_in_4bit)")
        out[keys[key]] = str(item).replace("torch.", "") if keys[key] == "dtype" else item
    return out


def _hub_strategy(value) -> dict:
    value = getattr(value, "value", value)
    if value in ("end", "every_save"):
        return {}
    raise ConfigError(f"hub_strategy={value!r}: prefopt pushes final/ at the end of training (save.push_to_hub); "
                      "checkpoints stay local")


def _sampling(value) -> dict:
    if value == "random":
        return {}
    if value == "group_by_length":
        return {"group_by_length": True}
    raise ConfigError(f"train_sampling_strategy={value!r}: prefopt shuffles (random) or groups by length "
                      "(data.group_by_length)")


def _resume(value) -> dict:
    return {} if value in (None, False) else {"resume_from": "latest" if value is True else str(value)}


def _pad_multiple(value) -> dict:
    return {} if value in (None, "auto") else {"pad_to_multiple_of": int(value)}


def _max_length(value) -> dict:
    if value is None:
        raise ConfigError("max_length=None: prefopt needs a maximum length (data.max_length; longer examples are "
                          "truncated and counted)")
    return {"max_length": int(value)}


def _truncation_mode(value) -> dict:
    """TRL cuts prompt + completion as one sequence: keep_start keeps its start (the completion's
    end goes first), keep_end its end (the prompt's start goes). prefopt's data.truncation: auto
    cuts the completions' ends once the prompt is down to its share, the prompt from the end that
    data.prompt_truncation names: keep_end, which is TRL's keep_end for the prompt."""
    if value in ("keep_start", "keep_end"):
        return {} if value == "keep_start" else {"prompt_truncation": "keep_end"}
    raise ConfigError(f"truncation_mode={value!r}: expected keep_start or keep_end")


def _completion_only(value) -> dict:
    if value in (None, True):
        return {}
    raise ConfigError("completion_only_loss=False: prefopt's SFT scores the completion only (the prompt is "
                      "context); to train on whole texts, give the data as a `text` column")


# Every TRL 1.16 DPOConfig field (TrainingArguments' included), then the other trainers' own fields
# and older TRL names. Loss fields (loss_type, loss_weights, rpo_alpha and the loss parameters) and
# the joint ones (bf16/fp16, sync_ref_model with its two settings) are handled in ``translate``.
FIELDS: dict[str, Rule] = {
    # ---- output, schedule, optimiser
    "output_dir": M(None, "output_dir", _unless_none("output_dir")),
    "per_device_train_batch_size": M(8, "per_device_train_batch_size"),
    "per_device_eval_batch_size": M(8, "per_device_eval_batch_size"),
    "gradient_accumulation_steps": M(1, "gradient_accumulation_steps"),
    "num_train_epochs": M(3.0, "num_train_epochs"),
    "max_steps": M(-1, "max_steps"),
    "learning_rate": M(1e-6, "learning_rate"),
    "lr_scheduler_type": M("linear", "lr_scheduler_type", lambda v: {"lr_scheduler_type": getattr(v, "value", v)}),
    "lr_scheduler_kwargs": M(None, "lr_scheduler_kwargs", lambda v: {"lr_scheduler_kwargs": dict(v or {})}),
    "warmup_steps": M(0, "warmup_steps / warmup_ratio", _warmup),
    "warmup_ratio": M(0.0, "warmup_ratio"),
    "optim": C("adamw_torch_fused", _optim),
    "optim_args": R(None, "prefopt's AdamW takes adam_beta1/2, adam_epsilon and weight_decay"),
    "optim_target_modules": R(None, "every trainable parameter is optimised; train a subset with LoRA (peft_config)"),
    "weight_decay": M(0.0, "weight_decay"),
    "adam_beta1": M(0.9, "adam_beta1"),
    "adam_beta2": M(0.999, "adam_beta2"),
    "adam_epsilon": M(1e-8, "adam_epsilon"),
    "max_grad_norm": M(1.0, "max_grad_norm"),
    "average_tokens_across_devices": R(True, "prefopt always normalises each loss over the whole step's tokens or "
                                             "examples on every process"),
    "label_smoothing_factor": R(0.0, "it smooths token cross-entropy; DPO's label smoothing (cDPO) is label_smoothing"),
    "seed": M(42, "seed"),
    "data_seed": R(None, "seed seeds the data order as well"),
    "full_determinism": R(False, "runs are reproducible for a seed without it; torch.use_deterministic_algorithms "
                                 "can be set in the script"),
    # ---- precision and memory
    "bf16": M(None, "mixed_precision"),
    "fp16": M(False, "mixed_precision"),
    "bf16_full_eval": R(False, "evaluation runs under the training autocast (mixed_precision), weights in model.dtype"),
    "fp16_full_eval": R(False, "evaluation runs under the training autocast (mixed_precision), weights in model.dtype"),
    "tf32": R(None, "prefopt leaves torch's TF32 setting alone: set torch.backends.cuda.matmul.allow_tf32"),
    "gradient_checkpointing": M(True, "gradient_checkpointing", _unless_none("gradient_checkpointing")),
    "activation_checkpointing": M(None, "gradient_checkpointing", _unless_none("gradient_checkpointing")),
    "gradient_checkpointing_kwargs": C(None, _checkpointing_kwargs),
    "activation_checkpointing_kwargs": C(None, _checkpointing_kwargs),
    "activation_offloading": R(False, "not implemented; gradient_checkpointing and the fused LM head "
                                      "(model.lm_head) are prefopt's memory savers"),
    "torch_compile": R(False, "prefopt does not compile the model: with variable-shaped batches every new shape "
                              "recompiles (measured in the README, 'Precision, checkpointing, compilation')"),
    "torch_compile_backend": R(None, "prefopt does not compile the model"),
    "torch_compile_mode": R(None, "prefopt does not compile the model"),
    "use_liger_kernel": R(False, "model.lm_head: fused (chosen by 'auto') computes log-probs chunk by chunk without "
                                 "the full logits, the memory saving Liger's fused linear cross-entropy brings"),
    "liger_kernel_config": R(None, "Liger kernels are not used; see model.lm_head"),
    "use_cache": I(False, "training never uses the KV cache; generation does"),
    "neftune_noise_alpha": R(None, "NEFTune noise is not implemented"),
    "torch_empty_cache_steps": I(None, "prefopt does not empty the CUDA cache periodically"),
    "auto_find_batch_size": R(False, "set per_device_train_batch_size, or data.max_tokens_per_batch for batches "
                                     "by tokens"),
    "use_cpu": R(False, "hide the GPUs (CUDA_VISIBLE_DEVICES=) or launch with `accelerate launch --cpu`"),
    # ---- logging and trackers
    "logging_strategy": C("steps", _strategy("logging_strategy", ("steps",), drop=True)),
    "logging_steps": C(10, _every("logging_steps")),
    "logging_first_step": M(False, "logging_first_step"),
    "logging_dir": R(None, "trackers log under OUTPUT_DIR/logs"),
    "log_level": I("passive", "prefopt's messages go to the 'prefopt' logger; set its level with logging"),
    "log_level_replica": I("warning", "only the main process prints"),
    "log_on_each_node": I(True, "only the main process prints"),
    "logging_nan_inf_filter": I(True, "a non-finite step is skipped and counted (skipped_steps), never averaged"),
    "include_num_input_tokens_seen": I("no", "num_tokens and tokens_per_second are always logged"),
    "disable_tqdm": C(None, lambda v: {} if v is None else {"progress_bar": not v}),
    "report_to": M("none", "report_to", lambda v: {"report_to": [] if v in (None, "none") else v}),
    "run_name": M(None, "run_name"),
    "project": I("huggingface", "the W&B project comes from WANDB_PROJECT, the run's name from run_name"),
    "trackio_space_id": R(None, "Trackio runs through accelerate with its own defaults"),
    "trackio_bucket_id": R(None, "Trackio runs through accelerate with its own defaults"),
    "trackio_static_space_id": R(None, "Trackio runs through accelerate with its own defaults"),
    "skip_memory_metrics": I(True, "no memory metrics are logged; bench/ measures memory"),
    "debug": R("", "transformers' debug modes are not available"),
    # ---- evaluation
    "eval_strategy": C("no", _strategy("eval_strategy", ("steps", "epoch", "no"))),
    "evaluation_strategy": C("no", _strategy("eval_strategy", ("steps", "epoch", "no"))),
    "eval_steps": C(None, _every("eval_steps")),
    "eval_on_start": M(False, "eval_on_start"),
    "eval_delay": R(0, "evaluations follow eval_strategy/eval_steps from the first step"),
    "prediction_loss_only": I(False, "evaluation reports the loss and the preference metrics"),
    "eval_accumulation_steps": I(None, "evaluation keeps sums and counts, never the predictions"),
    "eval_do_concat_batches": I(True, "evaluation keeps sums and counts, never the predictions"),
    "eval_use_gather_object": I(False, "evaluation keeps sums and counts, never the predictions"),
    "batch_eval_metrics": R(False, "compute_metrics is not supported (evaluate() reports the preference metrics)"),
    "include_for_metrics": R(None, "compute_metrics is not supported (evaluate() reports the preference metrics)"),
    "label_names": I(None, "prefopt's batches have no label columns"),
    "load_best_model_at_end": R(False, "final/ is the last model; checkpoints/step-N keep the others and "
                                       "metrics.jsonl their eval metrics"),
    "metric_for_best_model": R(None, "no best-model selection: final/ is the last model (see load_best_model_at_end)"),
    "greater_is_better": R(None, "no best-model selection: final/ is the last model (see load_best_model_at_end)"),
    # ---- checkpoints and the hub
    "save_strategy": C("steps", _strategy("save_strategy", ("steps", "epoch", "no"))),
    "save_steps": C(500, _every("save_steps")),
    "save_total_limit": M(None, "save_total_limit"),
    "save_only_model": R(False, "checkpoints hold what an exact resume needs (trainable weights, optimizer, "
                                "schedule, RNG, data position); final/ is the model alone"),
    "save_on_each_node": I(False, "checkpoints are written once, on shared storage"),
    "save_safetensors": R(True, "weights are always saved as safetensors"),
    "enable_jit_checkpoint": R(False, "SIGTERM/SIGINT already save a checkpoint and stop (exit 128 + signal)"),
    "overwrite_output_dir": M(False, "overwrite_output_dir"),
    "resume_from_checkpoint": C(None, _resume),
    "ignore_data_skip": R(False, "a resume continues at the exact batch it stopped at"),
    "restore_callback_states_from_checkpoint": R(False, "callback states are not saved in checkpoints"),
    "push_to_hub": M(False, "push_to_hub"),
    "hub_model_id": M(None, "hub_model_id"),
    "hub_private_repo": M(None, "hub_private_repo"),
    "hub_revision": M(None, "hub_revision"),
    "hub_strategy": C("every_save", _hub_strategy),
    "hub_token": R(None, "give the token as HF_TOKEN or with `hf auth login`: prefopt never writes it into config.yaml"),
    "hub_always_push": I(False, "the push at the end of training waits for the upload"),
    # ---- data loading
    "dataloader_drop_last": R(False, "every example is used; the last micro-batch of an epoch may be smaller"),
    "dataloader_num_workers": I(0, NO_EFFECT_LOADER),
    "dataloader_pin_memory": I(True, NO_EFFECT_LOADER),
    "dataloader_persistent_workers": I(False, NO_EFFECT_LOADER),
    "dataloader_prefetch_factor": I(None, NO_EFFECT_LOADER),
    "dataloader_multiprocessing_context": I(None, NO_EFFECT_LOADER),
    "dataloader_in_order": I(True, NO_EFFECT_LOADER),
    "remove_unused_columns": I(True, "only the columns the loss reads are kept"),
    "length_column_name": I("length", "lengths are counted from the tokenised examples"),
    "train_sampling_strategy": C("random", _sampling),
    # ---- distributed (accelerate owns it)
    "accelerator_config": R(None, ACCELERATE),
    "parallelism_config": R(None, ACCELERATE),
    "fsdp": R(None, ACCELERATE),
    "fsdp_config": R(None, ACCELERATE),
    "deepspeed": R(None, ACCELERATE),
    "ddp_backend": R(None, ACCELERATE),
    "ddp_timeout": R(1800, ACCELERATE),
    "ddp_find_unused_parameters": R(None, ACCELERATE),
    "ddp_bucket_cap_mb": R(None, ACCELERATE),
    "ddp_broadcast_buffers": R(None, ACCELERATE),
    "ddp_static_graph": R(None, ACCELERATE),
    "local_rank": I(-1, "set by the launcher"),
    "do_train": I(False, "scripts call train() and evaluate() themselves"),
    "do_eval": I(False, "scripts call train() and evaluate() themselves"),
    "do_predict": I(False, "scripts call train() and evaluate() themselves"),
    # ---- DPOConfig's own
    "model_init_kwargs": C(None, _model_init_kwargs),
    "trust_remote_code": M(False, "trust_remote_code"),
    "disable_dropout": M(True, "disable_dropout"),
    "router_aux_loss_coef": R(None, "the router's auxiliary (load-balancing) loss of MoE models is not added"),
    "dataset_num_proc": M(None, "num_proc", _unless_none("num_proc")),
    "max_length": M(1024, "max_length", _max_length),
    "max_prompt_length": M(None, "max_prompt_length"),
    "truncation_mode": C("keep_start", _truncation_mode),
    "padding_free": C(False, lambda v: {"layout": "packed"} if v else {}),
    "pad_to_multiple_of": M("auto", "pad_to_multiple_of", _pad_multiple),
    "pad_token": R(None, "prefopt pads with the tokenizer's pad token (EOS when it has none): set "
                         "tokenizer.pad_token on the processing_class"),
    "precompute_ref_log_probs": C(False, lambda v: {"reference_strategy": "precomputed"} if v else {}),
    "precompute_ref_batch_size": I(None, "the reference pre-pass uses per_device_eval_batch_size"),
    "reference_free": C(False, lambda v: {"reference_strategy": "none"} if v else {}),
    "max_completion_length": R(None, "completions are truncated to what max_length leaves after the prompt"),
    "generate_during_eval": R(False, "sampled evaluation is `prefopt eval` with eval.generate: true"),
    "use_logits_to_keep": I(False, "model.lm_head (auto) already runs the LM head on the completion positions only"),
    "padding_value": R(None, "padding uses the tokenizer's pad token"),
    "label_pad_token_id": R(None, "prefopt's batches carry masks, not padded labels"),
    "is_encoder_decoder": R(None, "encoder-decoder models are not supported (causal LMs and sequence classifiers)"),
    "model_adapter_name": R(None, "the reference of a LoRA policy is the base with its adapters disabled "
                                  "(reference.strategy: lora)"),
    "ref_adapter_name": R(None, "the reference of a LoRA policy is the base with its adapters disabled "
                                "(reference.strategy: lora)"),
    "force_use_ref_model": R(False, "with LoRA pass ref_model= and reference.strategy: model"),
    "tools": R(None, "tool schemas in the chat template are not supported"),
    # ---- SFTConfig's, RewardConfig's own
    "dataset_text_field": C("text", lambda v: {} if v == "text" else {"columns": {"text": v}}),
    "packing": C(False, lambda v: {"layout": "packed"} if v else {}),
    "packing_strategy": I("bfd", "packed rows are filled in order within a micro-batch (data.layout: packed)"),
    "eval_packing": I(None, "evaluation uses the training layout"),
    "shuffle_dataset": I(False, "the training order is always shuffled by seed"),
    "completion_only_loss": C(None, _completion_only),
    "assistant_only_loss": R(False, "prefopt's SFT scores the final completion; earlier assistant turns are context"),
    "dataset_kwargs": R(None, "data is read by prefopt's adapters (data.format, data.columns)"),
    "eos_token": R(None, "the tokenizer's EOS ends every completion: set it on the processing_class"),
    "chat_template_path": M(None, "chat_template", lambda v: {} if v is None else {"chat_template": _read(v)}),
    # ---- `trl dpo`'s ModelConfig and ScriptArguments (the LoRA fields: LORA below)
    "model_name_or_path": M(None, "model_name_or_path"),
    "model_revision": R("main", "prefopt loads a model's default revision; download another one to a directory "
                                "and give its path"),
    "dtype": M("float32", "dtype"),
    "attn_implementation": M(None, "attn_implementation"),
    "torch_dtype": M(None, "dtype", _unless_none("dtype", lambda v: str(v).replace("torch.", ""))),
    "load_in_4bit": M(False, "load_in_4bit"),
    "load_in_8bit": R(False, "prefopt's QLoRA loads 4-bit NF4 bases (load_in_4bit)"),
    "bnb_4bit_quant_type": R("nf4", "prefopt's QLoRA uses nf4"),
    "use_bnb_nested_quant": R(False, "prefopt's QLoRA does not quantize the quantization constants"),
    "bnb_4bit_quant_storage": R(None, "prefopt's QLoRA stores 4-bit weights as bitsandbytes does by default"),
    "lora_task_type": R("CAUSAL_LM", "the task type follows the model: CAUSAL_LM, SEQ_CLS for a reward model"),
    "dataset_name": M(None, "data.train", _unless_none("data.train")),
    "dataset_train_split": M("train", "data.split", lambda v: {"data.split": v}),
    "dataset_test_split": I("test", "eval data is data.eval (another file, folder or hub id) or a held-out share "
                                    "of the training data (data.eval_split_size)"),
    "dataset_config": R(None, "hub datasets are read with their default configuration"),
    "dataset_streaming": M(False, "data.streaming"),
    "ignore_bias_buffers": I(False, "only DDP's bias buffers matter there; prefopt's models have none to sync"),
}

# `trl dpo`'s LoRA flags -> peft.LoraConfig fields of model.lora; they act with use_peft=True, as in TRL.
LORA = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
        "lora_target_modules": "target_modules", "lora_modules_to_save": "modules_to_save",
        "lora_target_parameters": "target_parameters", "use_rslora": "use_rslora", "use_dora": "use_dora"}
LORA_DEFAULTS = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target_modules": None,
                 "lora_modules_to_save": None, "lora_target_parameters": None, "use_rslora": False, "use_dora": False}

# Loss fields: renamed to prefopt's parameter names (the same value), and the loss-type names of
# the trainers whose TRL names differ from the registry's (DPO's are registry aliases).
LOSS_PARAMS = {"beta": "beta", "label_smoothing": "label_smoothing", "f_divergence_type": "f_divergence",
               "f_alpha_divergence_coef": "f_alpha", "discopop_tau": "tau", "ld_alpha": "ld_alpha",
               "use_weighting": "wpo", "cpo_alpha": "alpha", "simpo_gamma": "gamma",
               "desirable_weight": "desirable_weight", "undesirable_weight": "undesirable_weight",
               "center_rewards_coefficient": "center_rewards_coefficient"}
LOSS_DEFAULTS = {"beta": 0.1, "label_smoothing": 0.0, "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5,
                 "discopop_tau": 0.05, "ld_alpha": None, "use_weighting": False, "cpo_alpha": 1.0, "simpo_gamma": 0.5,
                 "desirable_weight": 1.0, "undesirable_weight": 1.0, "center_rewards_coefficient": None}
F_DIVERGENCES = {"js_divergence": "js", "alpha_divergence": "alpha"}  # TRL's values -> prefopt's
# A loss type maps to a registry name, or to a term (a name with fixed parameters).
LOSS_TYPES = {"cpo": {"sigmoid": "cpo", "simpo": "simpo", "hinge": {"name": "cpo", "loss": "hinge"},
                      "ipo": {"name": "cpo", "loss": "ipo"}, "alphapo": "alphapo"},
              "kto": {"kto": "kto"}}
NOT_YET = {"kto": {"apo_zero_unpaired": "APO-zero for unpaired data"}}
JOINT = ("loss_type", "loss_weights", "rpo_alpha", "sync_ref_model", "ref_model_sync_steps", "ref_model_mixup_alpha",
         "alpha", "use_peft", *LORA)


def _read(path) -> str:
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"chat_template_path: {p} is not a file")
    return p.read_text()


def is_trl_field(name: str) -> bool:
    return name in FIELDS or name in LOSS_PARAMS or name in JOINT


def _value(value):
    return getattr(value, "value", value)  # transformers' enums (IntervalStrategy, SchedulerType...)


def _same(value, default) -> bool:
    value = getattr(value, "value", value)
    return value == default or (value in (None, "", {}, []) and default in (None, "", {}, []))


DOCS = {
    "warmup_steps": "`train.warmup_steps`; a float below 1 is `train.warmup_ratio` (transformers 5)",
    "optim": "adamw_torch, adamw_torch_fused, adamw_hf: prefopt's AdamW; others refused",
    "gradient_checkpointing_kwargs": "none or {use_reentrant: False} (prefopt's); others refused",
    "activation_checkpointing_kwargs": "none or {use_reentrant: False} (prefopt's); others refused",
    "logging_strategy": "steps; epoch and no refused",
    "logging_steps": "`train.logging_steps`; a fraction refused",
    "eval_steps": "`train.eval_steps`; a fraction refused",
    "save_steps": "`train.save_steps`; a fraction refused",
    "disable_tqdm": "`train.progress_bar` = not disable_tqdm",
    "report_to": "`train.report_to` ('none': none)",
    "eval_strategy": "`train.eval_strategy` (steps, epoch, no); steps without eval_steps: every logging_steps",
    "evaluation_strategy": "as eval_strategy (older name)",
    "save_strategy": "`train.save_strategy` (steps, epoch, no); steps without save_steps: 500",
    "resume_from_checkpoint": "`train.resume_from` (True: latest)",
    "hub_strategy": "end, every_save: final/ is pushed at the end of training; others refused",
    "train_sampling_strategy": "random; group_by_length: `data.group_by_length`; others refused",
    "model_init_kwargs": "dtype / torch_dtype: `model.dtype`; attn_implementation, trust_remote_code: `model.*`; "
                         "other keys refused",
    "max_length": "`data.max_length` (None refused)",
    "padding_free": "True: `data.layout: packed`",
    "packing": "True: `data.layout: packed`",
    "pad_to_multiple_of": "`data.pad_to_multiple_of` ('auto': none)",
    "precompute_ref_log_probs": "True: `reference.strategy: precomputed`",
    "reference_free": "True: `reference.strategy: none`",
    "dataset_text_field": "`data.columns: {text: FIELD}`",
    "completion_only_loss": "None, True: prefopt scores the completion; False refused",
    "chat_template_path": "`model.chat_template` (the file's template)",
    "bf16": "True: `train.mixed_precision: bf16`; False: `no` (not passed: `auto`, bf16 on a CUDA GPU that has it)",
    "fp16": "True: `train.mixed_precision: fp16`",
    "dataset_train_split": "`data.split`",
    "truncation_mode": "accepted: prefopt cuts the completions' ends and, when the prompt must give room too, "
                       "its start (`data.prompt_truncation: keep_end`, `data.truncation`)",
}


def table_rows() -> list[tuple[str, str, str]]:
    """(TRL field, TRL default, what prefopt does): the README's table."""
    from prefopt.config_flat import flat_target

    rows = []
    for name, rule in FIELDS.items():
        if name in DOCS:
            what = DOCS[name]
        elif rule.to:
            what = f"`{flat_target(rule.to) or rule.to}`"
        elif rule.refuse:
            what = f"refused unless default: {rule.refuse}"
        else:
            what = f"accepted, no effect: {rule.ignore}"
        rows.append((name, repr(rule.default), what))
    return rows
