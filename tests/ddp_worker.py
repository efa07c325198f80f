"""Launched by tests/test_ddp.py under torch.distributed.run (not collected by pytest).

Runs the first optimizer step of a tiny DPO or SFT job (2 pairs per micro-batch, 2 micro-batches
per step) and saves the all-reduced gradient that the optimizer would apply.
"""
import json
import sys

import torch

from prefopt import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from prefopt.train import loop
from prefopt.train.checkpoint import TrainState


def first_step_gradient(trainer) -> torch.Tensor:
    job = trainer.setup()
    captured = {}
    job.optimizer.step = lambda *a, **k: captured.setdefault(
        "g", torch.cat([p.grad.flatten().clone() for p in job.model.parameters()]))
    loop.optimizer_step(job, next(loop._windows(job, TrainState())), loop.MetricAccumulator())
    return captured["g"], job.accelerator


def build(loss: str, model_dir: str, records: list, out: str, micro: int, accum: int):
    cls, cfg = (SFTTrainer, SFTConfig) if loss == "sft" else (DPOTrainer, DPOConfig)
    args = cfg(output_dir=out, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
               max_grad_norm=None, max_length=64, max_prompt_length=32, progress_bar=False)
    return cls(model_dir, train_dataset=records, args=args)


if __name__ == "__main__":
    losses, model_dir, data_path, out = sys.argv[1].split(","), *sys.argv[2:5]
    records = json.load(open(data_path))[:8]
    for loss in losses:  # one launch for all losses: process start-up dominates the cost
        grad, accelerator = first_step_gradient(build(loss, model_dir, records, f"{out}/{loss}", 2, 2))
        if accelerator.is_main_process:
            torch.save({"grad": grad, "processes": accelerator.num_processes}, f"{out}/{loss}.pt")
