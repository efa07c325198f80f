"""FSDP2 through accelerate on 2 CPU processes (gloo), launched with the shipped
configs/accelerate/fsdp2.yaml, against one process.

accelerate 1.15 enables FSDP only on an accelerator device; the worker (tests/fsdp_worker.py)
lifts that one gate, so every FSDP2 code path after it is the real one: ``fully_shard`` on a CPU
mesh with the shipped wrap policy and cpu-RAM-efficient loading, sharded checkpoints
(torch.distributed.checkpoint), the full state dict gathered for ``final/``, the frozen and the
TR-DPO references sharded like the policy. Each run matches one process with the same examples
per optimizer step (2 processes x 2 pairs x A accumulation = 1 process x 2 pairs x 2A).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from ddp_worker import whole_run  # noqa: E402
from fsdp_worker import KTO as KTO_ARGS, LORA_PRE, TRDPO  # noqa: E402
from test_ddp import free_port, rows  # noqa: E402

from prefopt import DPOConfig, DPOTrainer  # noqa: E402

ROOT = HERE.parent
DATA = ROOT / "prefopt" / "demo" / "data" / "dpo_en_demo.json"
KTO = HERE / "fixtures" / "kto_en_demo_20.json"


def weights(run: Path, name: str = "model.safetensors") -> dict:
    return load_file(run / "final" / name)


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert sorted(a) == sorted(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, worst


def test_fsdp2_on_two_cpu_processes_matches_one(tiny_model_dir, demo_records, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
           str(HERE / "fsdp_worker.py"), "run,resume,trdpo,kto,lora-pre", str(tiny_model_dir), str(DATA),
           str(tmp_path), str(KTO)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    one = tmp_path / "one"

    # the whole DPO run: schedule, losses, exactly counted eval, final weights
    whole_run(str(tiny_model_dir), demo_records, str(one / "run"), 2, 4)
    two_rows, one_rows = rows(tmp_path / "run"), rows(one / "run")
    train2, train1 = [r for r in two_rows if "loss" in r], [r for r in one_rows if "loss" in r]
    assert [(r["step"], r["learning_rate"]) for r in train2] == [(r["step"], r["learning_rate"]) for r in train1]
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(train2, train1)) and len(train1) == 2
    assert abs(two_rows[-1]["eval/loss"] - one_rows[-1]["eval/loss"]) < 1e-5
    assert_same_weights(weights(tmp_path / "run"), weights(one / "run"), 1e-5)
    # the sharded state dict was gathered whole into final/ (not one shard, not DTensors)
    assert weights(tmp_path / "run")["model.embed_tokens.weight"].shape == (512, 32)

    # a sharded checkpoint (one DCP folder, a RNG state per process) resumes bit-exactly
    step1 = tmp_path / "resume" / "full" / "checkpoints" / "step-1"
    assert (step1 / "pytorch_model_fsdp_0").is_dir() and (step1 / "random_states_1.pkl").is_file()
    assert not (step1 / "model.safetensors").exists()
    assert_same_weights(weights(tmp_path / "resume" / "full"), weights(tmp_path / "resume" / "resumed"), 1e-12)

    # TR-DPO: the moving reference is sharded like the policy and soft-updated shard by shard
    info = json.loads((tmp_path / "trdpo.json").read_text())
    assert info == {"syncs": 3, "parameter_types": ["DTensor"]}
    DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:12],
               args=DPOConfig(output_dir=str(one / "trdpo"), gradient_accumulation_steps=2, **TRDPO)).train()
    assert_same_weights(weights(tmp_path / "trdpo"), weights(one / "trdpo"), 1e-5)

    # KTO: z0 over both processes' mismatched pairs equals one process's over the same examples
    DPOTrainer(str(tiny_model_dir), None, loss="kto", train_dataset=str(KTO),
               args=DPOConfig(output_dir=str(one / "kto"), gradient_accumulation_steps=2, **KTO_ARGS)).train()
    kto2, kto1 = ([r for r in rows(run) if "loss" in r] for run in (tmp_path / "kto", one / "kto"))
    assert [r["step"] for r in kto2] == [r["step"] for r in kto1] == [1, 2] and kto1[1]["kl"] > 1
    for a, b in zip(kto2, kto1):  # summed in another order over 2 processes: float32 rounding only
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["kl"] - b["kl"]) < 1e-3 * b["kl"] + 1e-6

    # LoRA with the precomputed reference (computed from the sharded base, adapters disabled)
    DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:12], args=DPOConfig(
        output_dir=str(one / "lora-pre"), gradient_accumulation_steps=2, **LORA_PRE,
        reference={"strategy": "precomputed", "cache_dir": str(tmp_path / "one-cache")})).train()
    adapters = weights(tmp_path / "lora-pre", "adapter_model.safetensors")
    assert adapters and all("lora_" in k for k in adapters)
    assert_same_weights(adapters, weights(one / "lora-pre", "adapter_model.safetensors"), 1e-5)
