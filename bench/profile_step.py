"""Where prefopt's training time goes: torch.profiler over a few steps of the bench shape.

    .venv/bin/python bench/profile_step.py [--out runs/bench] [--steps 6] [--strategy model]

Uses the model and pairs that ``bench/run.py`` prepared in ``OUT/model`` and
``OUT/data/pairs.jsonl`` (run it first). Prints the operators by self CPU time, then the
matrix products by shape with their GFLOP/s (the profiler's FLOP counts).
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench", help="bench/run.py's output folder")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--strategy", default="model", help="reference.strategy (model: the reference runs online)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from prefopt import DPOConfig, DPOTrainer

    out = Path(args.out)
    model, data = out / "model", out / "data" / "pairs.jsonl"
    if not model.is_dir() or not data.is_file():
        raise SystemExit(f"{model} or {data} is missing: run bench/run.py --out {out} first")
    run_dir = out / "profile_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    trainer = DPOTrainer(str(model), None, beta=0.1, train_dataset=str(data), tokenizer=str(model), args=DPOConfig(**{
        "output_dir": str(run_dir), "train.per_device_train_batch_size": args.batch_size,
        "train.max_steps": args.steps, "train.learning_rate": 1e-6, "train.save_steps": 0,
        "train.progress_bar": False, "data.max_length": args.max_length, "reference.strategy": args.strategy}))
    trainer.setup()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        started = time.time()
        trainer.train()
        print(f"{args.steps} steps in {time.time() - started:.1f} s (profiler overhead included)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    rows, flops, seconds = [], 0, 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in ("aten::mm", "aten::addmm", "aten::bmm") and e.self_cpu_time_total:
            rows.append((e.self_cpu_time_total / 1e6, e.flops, e.count, str(e.input_shapes)))
            flops, seconds = flops + e.flops, seconds + e.self_cpu_time_total / 1e6
    print(f"matrix products: {flops / 1e9:.0f} GFLOP in {seconds:.2f} s = {flops / 1e9 / seconds:.0f} GFLOP/s")
    for s, f, n, shapes in sorted(rows, reverse=True)[:20]:
        print(f"{s * 1000:8.0f} ms {f / 1e9 / s:6.1f} GFLOP/s  x{n:<4d} {shapes[:90]}")


if __name__ == "__main__":
    main()
