"""Launched by tests/test_sharded.py with ``accelerate launch --config_file
configs/accelerate/{fsdp2,zero2,zero3}.yaml`` on 2 CPU processes (not collected by pytest).

accelerate 1.15 turns an FSDP or DeepSpeed launch into FSDP or DeepSpeed only on an accelerator
device: on CPU its ``AcceleratorState`` drops the plugin and each rank would train alone.
``lift_device_gate`` builds the CPU (gloo) process group, then sets the state to FSDP or
DeepSpeed with the plugin accelerate's launcher described in the environment (the shipped file's
settings), as ``AcceleratorState`` does on a GPU. Everything after that is the real code path:
accelerate's ``_prepare_fsdp2`` (``fully_shard`` on a CPU mesh, cpu-RAM-efficient loading from
rank 0) or ``_prepare_deepspeed`` (DeepSpeed's engine on its CPU accelerator,
``DS_ACCELERATOR=cpu``), their sharded checkpoints and state-dict gathering, and prefopt's
handling of all of them. One thing is skipped: DeepSpeed's JIT-compiled shared-memory all-reduce
for CPU inference (``build_shm_op``), a speed-up whose C++ build would cost CI a minute and a half;
DeepSpeed then uses torch.distributed's collectives.

Tasks (argv[1], comma-separated), each writing under OUT:
  run          the DPO run of ddp_worker.whole_run (16 pairs, 2 steps, eval on 10)
  trdpo-refused   TR-DPO under DeepSpeed: each rank writes the ConfigError it got
  resume       3 steps with a checkpoint at every step, then a run resumed from step 1
  trdpo        TR-DPO (soft update every step, alpha 0.5; the moving reference is sharded like the
               policy), 3 steps on 12 pairs
  kto          KTO on 8 unpaired examples, 2 steps (z0 from both processes' mismatched pairs)
  lora-pre     LoRA with the precomputed reference, 3 steps
"""
import json
import os
import sys

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType

from prefopt import DPOConfig, DPOTrainer
from prefopt.errors import ConfigError
from ddp_worker import SHORT, whole_run

KTO = dict(per_device_train_batch_size=2, max_examples=8, num_train_epochs=1, learning_rate=5e-3, **SHORT)
LORA_PRE = dict(per_device_train_batch_size=2, max_steps=3, learning_rate=5e-3, lora={"r": 4}, **SHORT)
TRDPO = dict(per_device_train_batch_size=2, max_steps=3, learning_rate=5e-3, sync_ref_model=True,
             ref_model_sync_steps=1, ref_model_mixup_alpha=0.5, **SHORT)


def lift_device_gate() -> None:
    real = accelerate.Accelerator
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
    if deepspeed:
        import deepspeed.comm.torch
        deepspeed.comm.torch.build_shm_op = lambda: None

    def sharded_on_cpu(*args, **kwargs):
        if PartialState._shared_state:  # a second trainer: its state starts again from the CPU group
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU
        accelerator = real(*args, **{**kwargs, "cpu": True})
        state = accelerator.state
        # the plugins are read from the launcher's FSDP_* / ACCELERATE_DEEPSPEED_* environment
        if deepspeed and state.__dict__.get("deepspeed_plugins") is None:
            import deepspeed as ds
            ds.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
            plugin = accelerate.DeepSpeedPlugin()
            plugin.set_mixed_precision(state.mixed_precision)
            plugin.select(_from_accelerator_state=True)
            state.deepspeed_plugins, kind = plugin, DistributedType.DEEPSPEED
        elif not deepspeed and state.__dict__.get("fsdp_plugin") is None:
            state.fsdp_plugin, kind = accelerate.FullyShardedDataParallelPlugin(), DistributedType.FSDP
        else:
            return accelerator
        state.distributed_type = kind
        PartialState._shared_state["distributed_type"] = kind  # as AcceleratorState does
        return accelerator

    accelerate.Accelerator = sharded_on_cpu


if __name__ == "__main__":
    tasks, model_dir, data_path, out = sys.argv[1].split(","), *sys.argv[2:5]  # argv[5]: the KTO data
    lift_device_gate()
    records = json.load(open(data_path))
    for task in tasks:
        if task == "run":
            trainer = whole_run(model_dir, records, f"{out}/{task}", 2, 2)
            reference = trainer.job.objective.reference
            if trainer.job.accelerator.is_fsdp2:  # units that keep their weights gathered after forward
                from prefopt.reference.synced import _reshard
                _reshard(reference.model)
            if trainer.job.accelerator.is_main_process:  # the reference: sharded (FSDP2), an engine (ZeRO-3)
                json.dump({"reference": type(reference.model).__name__, "parameter_types": sorted(
                    {type(p).__name__ for p in reference.model.parameters()})}, open(f"{out}/{task}.json", "w"))
        elif task == "trdpo-refused":  # DeepSpeed's checkpoints cannot hold TR-DPO's moving reference
            try:
                DPOTrainer(model_dir, None, train_dataset=records[:12],
                           args=DPOConfig(output_dir=f"{out}/{task}", **TRDPO)).train()
            except ConfigError as e:
                open(f"{out}/{task}-{os.environ['RANK']}.txt", "w").write(str(e))
        elif task == "resume":
            common = dict(per_device_train_batch_size=2, max_steps=3, save_steps=1, learning_rate=5e-3, **SHORT)
            for name, resume in (("full", None), ("resumed", f"{out}/{task}/full/checkpoints/step-1")):
                args = DPOConfig(output_dir=f"{out}/{task}/{name}", resume_from=resume, **common)
                DPOTrainer(model_dir, None, train_dataset=records[:12], args=args).train()
        elif task == "trdpo":
            trainer = DPOTrainer(model_dir, None, train_dataset=records[:12],
                                 args=DPOConfig(output_dir=f"{out}/{task}", **TRDPO))
            trainer.train()
            reference = trainer.job.objective.reference
            if trainer.job.accelerator.is_main_process:
                kinds = {type(p).__name__ for p in reference.model.parameters()}
                json.dump({"syncs": reference.syncs, "parameter_types": sorted(kinds)},
                          open(f"{out}/{task}.json", "w"))
        elif task == "kto":
            args = DPOConfig(output_dir=f"{out}/{task}", **KTO)
            DPOTrainer(model_dir, None, loss="kto", train_dataset=sys.argv[5], args=args).train()
        elif task == "lora-pre":
            args = DPOConfig(output_dir=f"{out}/{task}", reference={"strategy": "precomputed", "cache_dir": f"{out}/cache"},
                             **LORA_PRE)
            DPOTrainer(model_dir, None, train_dataset=records[:12], args=args).train()
