"""Launched by tests/test_ddp.py under torch.distributed.run (not collected by pytest).

Tasks (comma-separated in argv[1]), each writing its result under OUT:
  grad-dpo, grad-sft, grad-dpo-packed, grad-dpo-padded
                       the all-reduced gradient of the first optimizer step (2 pairs per
                       micro-batch, 2 micro-batches per step)
  run-dpo              a whole run: 16 pairs, 1 epoch, eval on 10 pairs (eval batches of 4,
                       so one process evaluates a padding batch)
  run-kto              KTO on 7 unpaired examples (a short last round)
  tokenise-once        setup with a fresh data cache: each rank writes how many times it tokenised
  generate             `prefopt generate` of OUT/prompts.jsonl, 3 batches over 2 processes
  run-stream           data.streaming on OUT/stream.jsonl (13 pairs: shares of 7 and 6), 5 steps with a
                       checkpoint at each, and a run resumed from step 3; each rank writes its share
  run-lora-pre         LoRA with the precomputed reference (13 + 5 examples: the pre-pass gives
                       the processes 3 and 2 batches, so one scores a filler), a DDP checkpoint
                       at step 1, then a second run resumed from it
  ckpt-agree           checkpoints every step; rank 1 fails to write its RNG-state file of step 2
                       (ENOSPC): each rank writes OUT/ckpt-agree-RANK.txt with the error it raised
"""
import json
import sys

import torch

from prefopt import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from helpers import first_step_gradient

SHORT = dict(max_grad_norm=None, max_length=64, max_prompt_length=32, progress_bar=False, logging_steps=1)


def build(loss: str, model_dir: str, records: list, out: str, micro: int, accum: int):
    """``loss`` is sft, dpo or dpo-LAYOUT (dpo in that data layout)."""
    loss, _, layout = loss.partition("-")
    cls, cfg = (SFTTrainer, SFTConfig) if loss == "sft" else (DPOTrainer, DPOConfig)
    args = cfg(output_dir=out, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
               **({"layout": layout} if layout else {}), **SHORT)
    return cls(model_dir, train_dataset=records, args=args)


def whole_run(model_dir: str, records: list, out: str, micro: int, accum: int, **extra) -> DPOTrainer:
    args = DPOConfig(output_dir=out, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                     per_device_eval_batch_size=4, num_train_epochs=1, learning_rate=1e-3, warmup_steps=1, **SHORT,
                     **extra)
    trainer = DPOTrainer(model_dir, None, train_dataset=records[:16], eval_dataset=records[16:26], args=args)
    trainer.train()
    return trainer


def generate_args(model_dir: str, out: str, run: str) -> list[str]:
    return ["generate", "configs/methods/generate.yaml", f"model.name_or_path={model_dir}", f"output_dir={run}",
            f"generate.prompts={out}/prompts.jsonl", "generate.batch_size=2", "generate.num_samples=2",
            "generate.max_new_tokens=8", "train.progress_bar=false"]


if __name__ == "__main__":
    tasks, model_dir, data_path, kto_path, out = sys.argv[1].split(","), *sys.argv[2:6]
    records = json.load(open(data_path))
    for task in tasks:
        if task.startswith("grad-"):
            loss = task[5:]
            trainer = build(loss, model_dir, records[:8], f"{out}/{task}", 2, 2)
            grad, accelerator = first_step_gradient(trainer), trainer.job.accelerator
            if accelerator.is_main_process:
                torch.save({"grad": grad, "processes": accelerator.num_processes}, f"{out}/{task}.pt")
        elif task == "run-dpo":
            whole_run(model_dir, records, f"{out}/{task}", 2, 2)
        elif task == "run-lora-pre":
            common = dict(per_device_train_batch_size=2, per_device_eval_batch_size=4, max_steps=3, save_steps=1,
                          learning_rate=5e-3, lora={"r": 4}, reference={"strategy": "precomputed",
                                                                        "cache_dir": f"{out}/cache"}, **SHORT)
            for name, resume in (("full", None), ("resumed", f"{out}/{task}/full/checkpoints/step-1")):
                args = DPOConfig(output_dir=f"{out}/{task}/{name}", resume_from=resume, **common)
                DPOTrainer(model_dir, None, train_dataset=records[:13], eval_dataset=records[13:18], args=args).train()
        elif task == "run-stream":
            common = dict(streaming=True, shuffle_buffer=4, max_steps=5, save_steps=1, learning_rate=5e-3,
                          per_device_train_batch_size=2, **SHORT)
            trainer = DPOTrainer(model_dir, None, train_dataset=f"{out}/stream.jsonl",
                                 args=DPOConfig(output_dir=f"{out}/{task}", **common))
            trainer.train()
            # after step 3 rank 0 is at micro-batch 3 of its first pass, rank 1 at the start of its second
            DPOTrainer(model_dir, None, train_dataset=f"{out}/stream.jsonl", args=DPOConfig(
                output_dir=f"{out}/{task}-resumed", resume_from=f"{out}/{task}/checkpoints/step-3", **common)).train()
            with open(f"{out}/{task}-{trainer.job.accelerator.process_index}.json", "w") as f:
                json.dump({"encoded": trainer._train_set.encoded,
                           "share": [e.uid for e in trainer._train_set.examples(0)]}, f)
        elif task == "tokenise-once":
            import os
            from prefopt.data import pipeline
            calls, real = [], pipeline.encode
            pipeline.encode = lambda *a, **k: calls.append(1) or real(*a, **k)
            args = DPOConfig(output_dir=f"{out}/{task}", cache_dir=f"{out}/{task}-cache", **SHORT)
            trainer = DPOTrainer(model_dir, None, train_dataset=records[:12], eval_dataset=records[12:16], args=args)
            trainer.setup()
            rank = trainer.job.accelerator.process_index
            with open(f"{out}/{task}-{rank}.json", "w") as f:
                json.dump({"encode_calls": len(calls), "examples": len(trainer._train_set.examples)}, f)
            pipeline.encode = real
        elif task == "generate":
            from prefopt.cli import main
            assert main(generate_args(model_dir, out, f"{out}/{task}")) == 0
        elif task == "ckpt-agree":
            import errno
            import os
            from prefopt.train.checkpoint import CheckpointError
            rank, real_save = int(os.environ["RANK"]), torch.save

            def save(obj, f, *a, **k):  # accelerate's save_state writes each rank's RNG states with torch.save
                if rank == 1 and str(f).endswith(".tmp-step-2/random_states_1.pkl"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_save(obj, f, *a, **k)

            torch.save, raised = save, "no error"
            try:
                DPOTrainer(model_dir, None, train_dataset=records[:8], args=DPOConfig(
                    output_dir=f"{out}/{task}", per_device_train_batch_size=2, max_steps=3, save_steps=1,
                    **SHORT)).train()
            except CheckpointError as e:
                raised = f"CheckpointError: {e}"
            finally:
                torch.save = real_save
            with open(f"{out}/{task}-{rank}.txt", "w") as f:
                f.write(raised)
        elif task == "run-kto":
            args = DPOConfig(output_dir=f"{out}/{task}", per_device_train_batch_size=2, max_examples=7,
                             num_train_epochs=1, **SHORT)
            DPOTrainer(model_dir, None, loss="kto", train_dataset=kto_path, eval_dataset=kto_path, args=args).train()
