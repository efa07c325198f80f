"""What prefopt tells DeepSpeed (through accelerate) so that its step is prefopt's step.

DeepSpeed owns gradient accumulation, clipping and the optimizer step: accelerate's wrappers
make ``optimizer.step()``/``scheduler.step()`` no-ops and the engine steps inside ``backward``
at an accumulation boundary. prefopt therefore
- fills the DeepSpeed config from the run's config: the micro-batch where it is ``auto``, and
  always ``gradient_accumulation_steps`` and ``gradient_clipping`` (= ``train.max_grad_norm``,
  0 for none; a different value in the accelerate file is replaced, with a log line), so the
  clipping is the one the run's config and metrics show;
- marks the boundary itself on the last micro-batch of each optimizer step (a short window at
  an epoch's end included), and undoes DeepSpeed's division of every loss by
  ``gradient_accumulation_steps``: prefopt's loss is already each micro-batch's share of the
  whole step (prefopt.train.loop), as in every other launch.
"""
from __future__ import annotations

import logging
import os

from prefopt.config import TrainConfig
from prefopt.errors import ConfigError

log = logging.getLogger("prefopt")


def check_process_group(accelerator) -> None:
    """Every launched process must be in accelerate's group: on a machine without CUDA,
    accelerate 1.15 forms none for DeepSpeed or FSDP (each rank reports 1 process) and every
    rank would train alone, each writing the same files."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise ConfigError(f"{launched} processes were launched but accelerate formed a group of "
                          f"{accelerator.num_processes} ({accelerator.distributed_type.value}); each would train "
                          f"alone. DeepSpeed and FSDP through accelerate need CUDA GPUs; on CPU launch plain DDP "
                          f"(configs/accelerate/ddp.yaml or torchrun)")


def configure_deepspeed(accelerator, tcfg: TrainConfig) -> None:
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    values = {"train_micro_batch_size_per_gpu": tcfg.per_device_train_batch_size,
              "gradient_accumulation_steps": tcfg.gradient_accumulation_steps,
              "gradient_clipping": tcfg.max_grad_norm or 0.0}
    for key, value in values.items():
        given = ds.get(key, "auto")
        if key != "train_micro_batch_size_per_gpu" and given not in ("auto", value):
            # the run's config decides: prefopt marks the accumulation boundaries itself, and a
            # clipping the run's config does not show would make its results unexplainable
            log.info("DeepSpeed %s: the accelerate config's %s is replaced by the run's %s", key, given, value)
        if given == "auto" or key != "train_micro_batch_size_per_gpu":
            ds[key] = value
    ds.pop("train_batch_size", None)  # DeepSpeed derives it (micro-batch x accumulation x data-parallel size)


def deepspeed_backward(accelerator, loss, last: bool) -> None:
    """Backward of one micro-batch under DeepSpeed; the engine clips, steps and zeroes when
    ``last`` (the step's last micro-batch)."""
    wrapped = accelerator.deepspeed_engine_wrapped
    wrapped.backward(loss * wrapped.engine.gradient_accumulation_steps(), sync_gradients=last)
