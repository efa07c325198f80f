"""The parts of transformers' Trainer surface a TRL script calls beyond train/evaluate/save_model
(log_metrics, save_metrics, save_state, push_to_hub), and the checks and results of TRL's
trainer arguments (data_collator, compute_metrics, quantization_config, optimizers, TrainOutput).
prefopt.trainer.Trainer mixes TRLMethods in; it supplies ``setup()`` and ``state``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from prefopt.errors import ConfigError


class TRLMethods:
    def log_metrics(self, split: str, metrics: dict) -> None:
        """Print ``metrics`` (transformers' Trainer.log_metrics), main process only."""
        if self.setup().accelerator.is_main_process:
            width = max(map(len, metrics), default=0)
            print(f"***** {split} metrics *****")
            for key in sorted(metrics):
                print(f"  {key:<{width}} = {metrics[key]:.6g}" if isinstance(metrics[key], float)
                      else f"  {key:<{width}} = {metrics[key]}")

    def save_metrics(self, split: str, metrics: dict) -> Path:
        """OUTPUT_DIR/{split}_results.json, merged into all_results.json (transformers' files)."""
        job = self.setup()
        path = job.output_dir / f"{split}_results.json"
        if job.accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(metrics, indent=2))
            every = job.output_dir / "all_results.json"
            merged = {**(json.loads(every.read_text()) if every.is_file() else {}), **metrics}
            every.write_text(json.dumps(merged, indent=2))
        return path

    def save_state(self) -> Path:
        """OUTPUT_DIR/trainer_state.json: transformers' TrainerState (global_step, log_history...)."""
        job = self.setup()
        path = job.output_dir / "trainer_state.json"
        if job.accelerator.is_main_process:
            self.state.save_to_json(str(path))
        return path

    def is_world_process_zero(self) -> bool:
        return self.setup().accelerator.is_main_process

    def push_to_hub(self, repo_id: str | None = None, commit_message: str = "End of training", **kwargs) -> str:
        """Upload final/ (saved first if it is not there yet) to the Hub repository ``repo_id``
        (default save.hub_model_id, else the output_dir's name); returns the commit's URL or the
        folder. A local directory as repo_id (a path that exists, or one starting with ``/``,
        ``./`` or ``file://``) receives a copy instead: the same code path, testable offline.
        TRL's other keywords (model_name, dataset_name, tags...) go into nothing but the log."""
        from prefopt.hub import push_folder

        job = self.setup()
        folder = job.output_dir / "final"
        if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
            folder = self.save_model()
        save = job.config.save
        target = repo_id or save.hub_model_id or job.output_dir.name
        if not job.accelerator.is_main_process:
            return target
        return push_folder(folder, target, private=save.hub_private_repo, revision=save.hub_revision,
                           commit_message=commit_message)


UNUSED_ARGUMENTS = {
    "preprocess_logits_for_metrics": "it prepares logits for compute_metrics, which prefopt does not take",
    "model_init": "pass the model (an object, a hub id or a directory) as model=",
    "formatting_func": "give the data in one of prefopt's formats (`prefopt formats`; a `text` column for plain "
                       "text), or map its columns with data.columns",
    "compute_loss_func": "the loss is the objective of the config: loss / loss_type (`prefopt losses` lists them), "
                         "or extra_losses={name: fn(step) -> tensor} added to it",
    "optimizer_cls_and_kwargs": "pass optimizers=(optimizer, scheduler) built over the model, or set learning_rate, "
                                "weight_decay and adam_* for prefopt's AdamW",
}


def refuse_trl_arguments(data_collator=None, compute_metrics=None, **loss_params) -> None:
    """TRL trainer arguments prefopt has no use for: refused with what it does instead."""
    for name, why in UNUSED_ARGUMENTS.items():
        if loss_params.get(name) is not None:
            raise ConfigError(f"{name}: not supported by prefopt; {why}")
        loss_params.pop(name, None)
    if data_collator is not None:
        raise ConfigError("data_collator: prefopt forms its batches itself from the tokenised examples (padded, "
                          "packed or prompt-shared layouts, data.layout), so a collator has nothing to act on; drop "
                          "it (padding to a multiple: pad_to_multiple_of; packing: padding_free=True)")
    if compute_metrics is not None:
        raise ConfigError("compute_metrics: TRL passes it the full-vocabulary logits (deprecated in TRL 1.16, to be "
                          "removed in 2.0), which prefopt never builds; evaluate() reports the loss, "
                          "rewards/chosen|rejected|margins|accuracies and the log-probs, and any metric of the model "
                          "can be computed on trainer.model after training")
    from prefopt.trl_compat import is_trl_field

    misplaced = sorted(k for k in loss_params if is_trl_field(k) and k not in ("beta", "label_smoothing"))
    if misplaced:
        raise ConfigError(f"{', '.join(misplaced)}: config fields, given to the trainer; pass them in the "
                          f"config: args=DPOConfig({misplaced[0]}=...)")


def four_bit(quantization_config) -> bool:
    """TRL's quantization_config: a 4-bit bitsandbytes config is prefopt's QLoRA (model.load_in_4bit,
    NF4 with bfloat16 compute); anything else is refused."""
    get = quantization_config.get if isinstance(quantization_config, dict) else \
        lambda k, d=None: getattr(quantization_config, k, d)
    if not get("load_in_4bit"):
        raise ConfigError("quantization_config: prefopt loads 4-bit NF4 bases for QLoRA (load_in_4bit=True); "
                          "8-bit and other quantizations are not supported")
    quant_type = get("bnb_4bit_quant_type", "nf4")
    if quant_type != "nf4":
        raise ConfigError(f"quantization_config: bnb_4bit_quant_type={quant_type!r}; prefopt's QLoRA uses nf4")
    if get("bnb_4bit_use_double_quant"):
        raise ConfigError("quantization_config: bnb_4bit_use_double_quant=True; prefopt's QLoRA does not quantize "
                          "the quantization constants")
    compute = str(get("bnb_4bit_compute_dtype", None) or "bfloat16").replace("torch.", "")
    if compute not in ("bfloat16", "float32"):
        raise ConfigError(f"quantization_config: bnb_4bit_compute_dtype={compute}; prefopt's QLoRA computes in "
                          "bfloat16")
    return True


def check_optimizers(optimizers, model, lora) -> tuple:
    """TRL's ``optimizers=(optimizer, scheduler)``: used as given (the optimizer over the model
    passed in); (None, None) builds prefopt's AdamW and schedule."""
    optimizer, scheduler = tuple(optimizers) if optimizers is not None else (None, None)
    if optimizer is None and scheduler is not None:
        raise ConfigError("optimizers=(None, scheduler): a scheduler needs its optimizer; pass both")
    if optimizer is not None and (not isinstance(model, torch.nn.Module) or lora):
        raise ConfigError("optimizers=(optimizer, ...): the optimizer must be built over the model object passed "
                          "as model= (with LoRA, over the PeftModel), before the trainer")
    return optimizer, scheduler


def train_output(state, train_state, seconds: float, examples_per_step: int) -> tuple:
    """(global_step, training_loss, metrics) as transformers' Trainer returns them (the caller logs
    the metrics as the final row of log_history, as there, then adds the last evaluation)."""
    rows = [r for r in state.log_history if "loss" in r]
    done = [(r["step"] - prev, r["loss"]) for prev, r in zip([0] + [r["step"] for r in rows], rows)]
    steps = sum(n for n, _ in done)
    training_loss = sum(n * loss for n, loss in done) / steps if steps else float("nan")
    metrics = {"train_runtime": round(seconds, 4),
               "train_samples_per_second": round(train_state.step * examples_per_step / max(seconds, 1e-9), 3),
               "train_steps_per_second": round(train_state.step / max(seconds, 1e-9), 3),
               "total_flos": 0.0, "train_loss": training_loss, "epoch": state.epoch}
    return train_state.step, training_loss, metrics
