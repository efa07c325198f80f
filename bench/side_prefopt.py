"""prefopt's side of the benchmark: one DPO run with prefopt.DPOTrainer, in its own process.

    python bench/side_prefopt.py SETTINGS.json RESULT.json

Only the public API is used: ``DPOTrainer``/``DPOConfig`` (dotted config keys),
``trainer.setup()`` (builds everything before training), ``trainer.model``, and the files
the loop writes (``OUTPUT_DIR/metrics.jsonl``, ``OUTPUT_DIR/data_report.json``).
"""
from __future__ import annotations

import time

T_PROCESS = time.time()

# prefopt's best CPU settings for the "best" row: dotted config keys (DPOConfig accepts them)
# applied on top of prefopt's defaults (data.layout auto -> shared, model.lm_head auto -> fused,
# train.mixed_precision auto -> float32 on CPU). The "matched" and "memory" rows ignore it.
# Leave reference.cache_dir unset: the default (OUTPUT_DIR/reference_cache) is wiped before every
# run, so each run pays for its own precompute, as TRL's does.
PREFOPT_BEST: dict = {"reference.strategy": "precomputed"}

# The "matched" row: fp32, no gradient checkpointing, the reference model run online (as TRL's).
PREFOPT_MATCHED: dict = {
    "train.mixed_precision": "no",
    "model.gradient_checkpointing": False,
    "reference.strategy": "model",
}


def config_overrides(row: str) -> dict:
    overrides = dict(PREFOPT_BEST) if row == "best" else dict(PREFOPT_MATCHED)
    if "reference.cache_dir" in overrides:
        raise SystemExit("PREFOPT_BEST must not set reference.cache_dir: a cache kept between runs would "
                         "skip the reference precompute that TRL pays for in every run")
    return overrides


def main() -> None:
    import json
    from pathlib import Path

    import torch
    import transformers  # noqa: F401  (imported before t0 like on TRL's side)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (trl imports these too)
    import datasets  # noqa: F401
    import accelerate  # noqa: F401
    import peft  # noqa: F401  (trl imports peft when it is installed)
    import prefopt
    from prefopt import DPOConfig, DPOTrainer

    import measure

    s = measure.load_settings()
    torch.set_num_threads(s["threads"])
    t0 = time.time()
    out_dir = Path(s["out_dir"]) / "prefopt"
    overrides = config_overrides(s["row"])
    keys = {
        "output_dir": str(out_dir),
        "train.per_device_train_batch_size": s["batch_size"],
        "train.gradient_accumulation_steps": 1,
        "train.max_steps": s["steps"],
        "train.learning_rate": s["learning_rate"],
        "train.lr_scheduler_type": "linear",
        "train.warmup_steps": 0,
        "train.seed": s["seed"],
        "train.logging_steps": 1,
        "train.save_steps": 0,
        "train.eval_steps": 0,
        "train.progress_bar": False,
        "data.max_length": s["max_length"],
        **overrides,
    }
    trainer = DPOTrainer(s["model_dir"], None, beta=0.1, train_dataset=s["data"], tokenizer=s["model_dir"],
                         args=DPOConfig(**keys))
    trainer.setup()
    window = measure.TrainWindow()
    window.attach()
    trainer.train()
    window.detach()
    t_end = time.time()

    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    first = next((r for r in rows if r["step"] == 1), {})
    report_path = out_dir / "data_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else []
    model = trainer.model
    result = {
        "side": "prefopt", "variant": s["variant"], "t_process": T_PROCESS, "import_s": t0 - T_PROCESS,
        **window.summary(t0), "after_train_s": t_end - window.step_ends[-1],
        # prefopt's own per-step timing (optimizer steps only) as a cross-check
        "train_s_loop": sum(r["num_tokens_step"] / r["tokens_per_second"] for r in _with_step_tokens(rows)
                            if r.get("tokens_per_second")),
        "first_step_loss": first.get("loss"),
        "first_step_logged": first,
        "losses": [r["loss"] for r in rows],
        "step_tokens": [r["num_tokens_step"] for r in _with_step_tokens(rows)],
        "steps": max((r["step"] for r in rows), default=0),
        "data_report": report,
        "config_overrides": overrides,
        "model_dtype": str(next(model.parameters()).dtype),
        "versions": {**measure.versions(), "prefopt": prefopt.__version__, "prefopt_path": prefopt.__file__},
    }
    measure.write_result(result)


def _with_step_tokens(rows: list[dict]) -> list[dict]:
    """metrics.jsonl carries the cumulative num_tokens; per-step counts are its differences."""
    out, previous = [], 0
    for r in rows:
        if "num_tokens" in r:
            out.append({**r, "num_tokens_step": r["num_tokens"] - previous})
            previous = r["num_tokens"]
    return out


if __name__ == "__main__":
    main()
