"""TRL's side of the benchmark: one DPO run with trl.DPOTrainer, in its own process.

    python bench/side_trl.py SETTINGS.json RESULT.json

SETTINGS (written by bench/run.py): model_dir, data (the JSONL both sides read), out_dir,
batch_size, steps, learning_rate, max_length, seed, threads, and the variant: bf16,
gradient_checkpointing, precompute_ref_log_probs.

TRL 1.16 specifics this side relies on (read in trl/trainer/dpo_trainer.py):
* ``DPOConfig`` defaults ``bf16=True`` and ``gradient_checkpointing=True``: both are set
  explicitly from the settings.
* With ``precompute_ref_log_probs=True`` and no ``ref_model``, no reference model is loaded
  and ``DPOTrainer.__init__`` runs the reference pass over the whole training set
  (``_precompute_ref_logps``) right after tokenising it, before ``train()``: it counts as
  setup. Its result is cached as a ``datasets`` cache file keyed by the dataset fingerprint
  and a hash of the weights, and a later run *reuses* that file; run.py gives every side
  process a fresh ``HF_DATASETS_CACHE`` so each run pays for its own precompute.
* Without precompute, the reference model is loaded again from the same path
  (``create_model_from_path``) and run online in every step.
* The trainer shuffles with its own sampler; this side replaces it with prefopt's epoch
  order (a ``torch.randperm`` seeded with seed + epoch) so both sides see the same pairs in
  the same order; run.py checks it with the first step's log-probs.
"""
from __future__ import annotations

import time

T_PROCESS = time.time()

import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402,F401
import datasets  # noqa: E402
import accelerate  # noqa: E402,F401
import trl  # noqa: E402,F401
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

import measure  # noqa: E402


class EpochOrderSampler(torch.utils.data.Sampler):
    """The order prefopt trains in: a permutation seeded with (seed + epoch) per epoch."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=gen).tolist())

    def __len__(self) -> int:
        return self.size


class BenchDPOTrainer(DPOTrainer):
    order_seed: int | None = None
    first_step_loss: float | None = None

    def _get_train_sampler(self, train_dataset=None):
        if self.order_seed is None:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return EpochOrderSampler(len(dataset), self.order_seed)

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if self.first_step_loss is None:  # unrounded, before any logging window averages it
            self.first_step_loss = float(loss.detach())
        return loss


class StepLog(TrainerCallback):
    """TRL's own view of the steps (a cross-check of measure.TrainWindow) and its logged metrics."""

    def __init__(self):
        self.begins: list[float] = []
        self.ends: list[float] = []
        self.logs: list[dict] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.begins.append(time.time())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.time())

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({"step": state.global_step, **(logs or {})})


def main() -> None:
    s = measure.load_settings()
    torch.set_num_threads(s["threads"])
    t0 = time.time()
    out_dir = Path(s["out_dir"])

    tokenizer = AutoTokenizer.from_pretrained(s["model_dir"])
    train_dataset = datasets.load_dataset("json", data_files=s["data"], split="train")
    args = DPOConfig(
        output_dir=str(out_dir / "trl"),
        per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=s["steps"],
        learning_rate=s["learning_rate"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_length=s["max_length"],
        seed=s["seed"],
        data_seed=s["seed"],
        bf16=s["bf16"],
        fp16=False,
        use_cpu=not torch.cuda.is_available(),  # bf16 on CPU is refused without it
        # TRL 1.16 defaults it to True; transformers 5 renamed it activation_checkpointing (set both)
        gradient_checkpointing=s["gradient_checkpointing"],
        activation_checkpointing=s["gradient_checkpointing"],
        precompute_ref_log_probs=s["precompute_ref_log_probs"],
        beta=0.1,
        loss_type=["sigmoid"],
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    steps_log = StepLog()
    BenchDPOTrainer.order_seed = s["seed"] if s.get("align_order", True) else None
    trainer = BenchDPOTrainer(model=s["model_dir"], ref_model=None, args=args, train_dataset=train_dataset,
                              processing_class=tokenizer, callbacks=[steps_log])
    window = measure.TrainWindow()
    window.attach()
    trainer.train()
    window.detach()
    t_end = time.time()

    result = {"side": "trl", "variant": s["variant"], "t_process": T_PROCESS, "import_s": t0 - T_PROCESS,
              **window.summary(t0), "after_train_s": t_end - window.step_ends[-1]}
    if steps_log.begins and steps_log.ends:
        result["train_s_callback"] = steps_log.ends[-1] - steps_log.begins[0]
        result["setup_s_callback"] = steps_log.begins[0] - t0
    step_logs = [log for log in steps_log.logs if "loss" in log]
    first = next((log for log in step_logs if log["step"] == 1), {})
    result.update(
        first_step_loss=trainer.first_step_loss,
        first_step_logged=first,
        losses=[log["loss"] for log in step_logs],
        steps=trainer.state.global_step,
        train_examples=len(trainer.train_dataset),
        model_dtype=str(next(trainer.model.parameters()).dtype),
        reference="precomputed" if s["precompute_ref_log_probs"] else "online model",
        optimizer=type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                       else trainer.optimizer).__name__ + f" ({args.optim})",
        versions=measure.versions(),
    )
    if any(not math.isfinite(x) for x in result["losses"]):
        result["warning"] = "non-finite loss"
    (out_dir / "trl_logs.json").write_text(json.dumps(steps_log.logs, indent=1))
    measure.write_result(result)


if __name__ == "__main__":
    main()
