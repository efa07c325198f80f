"""FSDP2 and DeepSpeed ZeRO-2/3 through accelerate on 2 CPU processes (gloo), each launched with
its shipped file in configs/accelerate/, against one process.

accelerate 1.15 enables FSDP and DeepSpeed only on an accelerator device; the worker
(tests/sharded_worker.py) lifts that one gate, so every code path after it is the real one:
``fully_shard`` on a CPU mesh with the shipped wrap policy, DeepSpeed's engines on its CPU
accelerator, their sharded checkpoints, the full state dict gathered for ``final/``, the frozen,
loaded and TR-DPO references sharded like the policy (ZeRO-3: in their own inference engine).
Each run matches one process with the same examples per optimizer step (2 processes x 2 pairs x
A accumulation = 1 process x 2 pairs x 2A). The DeepSpeed files ask for bf16; the launches here
run float32 (``--mixed_precision no``) so that the comparison is exact.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from ddp_worker import whole_run  # noqa: E402
from sharded_worker import KTO as KTO_ARGS, LORA_PRE, TRDPO  # noqa: E402
from test_ddp import free_port, rows  # noqa: E402

from prefopt import DPOConfig, DPOTrainer  # noqa: E402

ROOT = HERE.parent
DATA = ROOT / "prefopt" / "demo" / "data" / "dpo_en_demo.json"
KTO = HERE / "fixtures" / "kto_en_demo_20.json"
ALL = ("run", "resume", "trdpo", "kto", "lora-pre")
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


def weights(run: Path, name: str = "model.safetensors") -> dict:
    return load_file(run / "final" / name)


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert sorted(a) == sorted(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def single(tiny_model_dir, demo_records, tmp_path_factory) -> Path:
    """The one-process runs every launch is compared with."""
    one, model = tmp_path_factory.mktemp("one"), str(tiny_model_dir)
    whole_run(model, demo_records, str(one / "run"), 2, 4)
    DPOTrainer(model, None, train_dataset=demo_records[:12],
               args=DPOConfig(output_dir=str(one / "trdpo"), gradient_accumulation_steps=2, **TRDPO)).train()
    DPOTrainer(model, None, loss="kto", train_dataset=str(KTO),
               args=DPOConfig(output_dir=str(one / "kto"), gradient_accumulation_steps=2, **KTO_ARGS)).train()
    DPOTrainer(model, None, train_dataset=demo_records[:12], args=DPOConfig(
        output_dir=str(one / "lora-pre"), gradient_accumulation_steps=2, **LORA_PRE,
        reference={"strategy": "precomputed", "cache_dir": str(one / "cache")})).train()
    return one


def launch(config: str, tasks: tuple, model_dir: Path, out: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / config), "--num_processes", "2", "--mixed_precision", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
           str(HERE / "sharded_worker.py"), ",".join(tasks), str(model_dir), str(DATA), str(out), str(KTO)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stderr


def check_against_one_process(out: Path, one: Path, tasks: tuple) -> None:
    if "run" in tasks:  # schedule, losses, exactly counted eval, final weights gathered whole
        train2, train1 = ([r for r in rows(run) if "loss" in r] for run in (out / "run", one / "run"))
        assert [(r["step"], r["learning_rate"]) for r in train2] == [(r["step"], r["learning_rate"]) for r in train1]
        assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(train2, train1)) and len(train1) == 2
        assert abs(rows(out / "run")[-1]["eval/loss"] - rows(one / "run")[-1]["eval/loss"]) < 1e-5
        assert_same_weights(weights(out / "run"), weights(one / "run"), 5e-5)
        assert weights(out / "run")["model.embed_tokens.weight"].shape == (512, 32)
    if "resume" in tasks:  # a sharded checkpoint resumes bit-exactly
        assert not (out / "resume" / "full" / "checkpoints" / "step-1" / "model.safetensors").exists()
        assert_same_weights(weights(out / "resume" / "full"), weights(out / "resume" / "resumed"), 0.0)
    if "trdpo" in tasks:  # the moving reference, sharded like the policy, soft-updated every step
        assert json.loads((out / "trdpo.json").read_text())["syncs"] == 3
        assert_same_weights(weights(out / "trdpo"), weights(one / "trdpo"), 1e-5)
    if "kto" in tasks:  # z0 from both processes' mismatched pairs = one process's over the same examples
        kto2, kto1 = ([r for r in rows(run) if "loss" in r] for run in (out / "kto", one / "kto"))
        assert [r["step"] for r in kto2] == [r["step"] for r in kto1] == [1, 2] and kto1[1]["kl"] > 1
        for a, b in zip(kto2, kto1):  # summed in another order: float32 rounding only
            assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["kl"] - b["kl"]) <= 1e-3 * b["kl"] + 1e-7
    if "lora-pre" in tasks:  # reference log-probs precomputed from the sharded base, adapters disabled
        adapters = weights(out / "lora-pre", "adapter_model.safetensors")
        assert adapters and all("lora_" in k for k in adapters)
        assert_same_weights(adapters, weights(one / "lora-pre", "adapter_model.safetensors"), 1e-5)


def test_fsdp2(single, tiny_model_dir, tmp_path):
    launch("fsdp2.yaml", ALL, tiny_model_dir, tmp_path)
    check_against_one_process(tmp_path, single, ALL)
    step1 = tmp_path / "resume" / "full" / "checkpoints" / "step-1"
    assert (step1 / "pytorch_model_fsdp_0").is_dir() and (step1 / "random_states_1.pkl").is_file()
    assert json.loads((tmp_path / "trdpo.json").read_text())["parameter_types"] == ["DTensor"]
    # the frozen reference is sharded like the policy (accelerate's prepare_model would leave it whole)
    assert json.loads((tmp_path / "run.json").read_text())["parameter_types"] == ["DTensor"]


@needs_deepspeed
def test_zero2(single, tiny_model_dir, tmp_path):
    """DeepSpeed owns accumulation: 2 micro-batches per step exercise prefopt's boundary marking
    and its undoing of DeepSpeed's loss division; the accelerate file's clipping (1.0) is replaced
    by the run's (none)."""
    log = launch("zero2.yaml", ("run", "resume", "trdpo-refused"), tiny_model_dir, tmp_path)
    check_against_one_process(tmp_path, single, ("run", "resume"))
    assert "DeepSpeed gradient_clipping: the accelerate config's 1.0 is replaced by the run's 0.0" in log
    for rank in (0, 1):
        assert "TR-DPO (reference.sync_steps) under DeepSpeed" in (tmp_path / f"trdpo-refused-{rank}.txt").read_text()


@needs_deepspeed
def test_zero3(single, tiny_model_dir, tmp_path):
    """The policy loads partitioned: the reference is loaded again from the policy's path (it
    cannot be copied) and runs in its own ZeRO-3 inference engine."""
    tasks = ("run", "resume", "kto", "lora-pre")  # TR-DPO under DeepSpeed: refused (test_zero2)
    log = launch("zero3.yaml", tasks, tiny_model_dir, tmp_path)
    check_against_one_process(tmp_path, single, tasks)
    assert f"reference: loaded from {tiny_model_dir}" in log
    assert json.loads((tmp_path / "run.json").read_text())["reference"] == "DeepSpeedEngine"
    ranks = sorted(p.name for p in (tmp_path / "resume" / "full" / "checkpoints" / "step-1" / "pytorch_model").iterdir())
    assert ranks == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
