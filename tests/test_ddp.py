"""1 process == 2 processes: DDP on CPU (gloo) through accelerate gives the single-process gradient.

Two processes with 2 pairs per micro-batch and 2 micro-batches per step see the same 8
examples as one process with 2 per micro-batch and 4 micro-batches; because every term is
divided by its units summed over the step *and the processes* (and scaled by the process
count that DDP's averaging divides out), the gradients must match.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from ddp_worker import build, first_step_gradient  # noqa: E402

DATA = HERE.parent / "prefopt" / "demo" / "data" / "dpo_en_demo.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_single_process_gradient(tiny_model_dir, demo_records, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(HERE / "ddp_worker.py"), "dpo,sft", str(tiny_model_dir),
           str(DATA), str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for loss in ("dpo", "sft"):
        saved = torch.load(tmp_path / f"{loss}.pt")
        assert saved["processes"] == 2, "accelerate did not form the 2-process group"
        single, _ = first_step_gradient(build(loss, str(tiny_model_dir), demo_records[:8], str(tmp_path / "one" / loss),
                                              2, 4))
        assert torch.allclose(saved["grad"], single, atol=1e-6, rtol=1e-4), loss
