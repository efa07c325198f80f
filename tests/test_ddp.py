"""1 process == 2 processes: DDP on CPU (gloo) through accelerate, against one process.

Two processes with 2 pairs per micro-batch and 2 micro-batches per step see the same
examples per step as one process with 4 micro-batches of 2. Because every term is divided
by its units summed over the step *and the processes*, the first gradient, the learning-rate
schedule, the epoch count, the final weights and the (exactly counted) eval metrics must all
match. One launch runs every task: process start-up dominates the cost.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from ddp_worker import build, generate_args, whole_run  # noqa: E402
from helpers import first_step_gradient  # noqa: E402
from prefopt.train.checkpoint import checkpoint_problem  # noqa: E402

DATA = HERE.parent / "prefopt" / "demo" / "data" / "dpo_en_demo.json"
KTO = HERE / "fixtures" / "kto_en_demo_20.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tiny_model_dir, demo_records, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    (tmp_path / "stream.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_records[:13]))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["conversations"][0]["value"]}) + "\n"
                                                    for r in demo_records[:5]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(HERE / "ddp_worker.py"), "grad-dpo,grad-sft,grad-dpo-packed,grad-dpo-padded,run-dpo,run-kto,run-lora-pre,generate,"
           "tokenise-once,run-stream,ckpt-agree",
           str(tiny_model_dir), str(DATA), str(KTO), str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=HERE.parent)
    assert run.returncode == 0, run.stderr[-3000:]

    for loss in ("dpo", "sft", "dpo-packed", "dpo-padded"):
        saved = torch.load(tmp_path / f"grad-{loss}.pt")
        assert saved["processes"] == 2, "accelerate did not form the 2-process group"
        single = first_step_gradient(build(loss, str(tiny_model_dir), demo_records[:8], str(tmp_path / "one" / loss),
                                           2, 4))
        assert torch.allclose(saved["grad"], single, atol=1e-6, rtol=1e-4), loss

    whole_run(str(tiny_model_dir), demo_records, str(tmp_path / "one" / "run"), 2, 4)
    two, one = rows(tmp_path / "run-dpo"), rows(tmp_path / "one" / "run")
    train2, train1 = [r for r in two if "loss" in r], [r for r in one if "loss" in r]
    assert [(r["step"], r["epoch"], r["learning_rate"]) for r in train2] == \
           [(r["step"], r["epoch"], r["learning_rate"]) for r in train1] == [(1, 0.5, 1e-3), (2, 1.0, 0.0)]
    for a, b in zip(train2, train1):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-5
    eval2, eval1 = two[-1], one[-1]
    assert set(eval2) == set(eval1) and all(abs(eval2[k] - eval1[k]) < 1e-5 for k in eval1 if k != "step")
    w2 = load_file(tmp_path / "run-dpo" / "final" / "model.safetensors")
    w1 = load_file(tmp_path / "one" / "run" / "final" / "model.safetensors")
    assert all(torch.allclose(w2[k], w1[k], atol=1e-5) for k in w1)

    kto = rows(tmp_path / "run-kto")
    assert [r["step"] for r in kto if "loss" in r] and "eval/kl" in kto[-1]

    # LoRA + precomputed reference under DDP: every example cached once (a filler batch dropped),
    # checkpoints hold the adapters only, and a resume ends with the same adapters
    lora = tmp_path / "run-lora-pre"
    (cache,) = (tmp_path / "cache").iterdir()
    assert json.loads((cache / "manifest.json").read_text())["examples"] == 18
    keys = load_file(lora / "full" / "checkpoints" / "step-1" / "model.safetensors").keys()
    assert keys and all("lora_" in k for k in keys)
    full = load_file(lora / "full" / "final" / "adapter_model.safetensors")
    resumed = load_file(lora / "resumed" / "final" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)

    # generation split over the processes (batch b seeded with seed + b) == one process
    from prefopt.cli import main
    assert main(generate_args(str(tiny_model_dir), str(tmp_path), str(tmp_path / "one" / "generate"))) == 0
    two, one = [(tmp_path / d / "generate" / "generations.jsonl").read_text().splitlines() for d in (".", "one")]
    assert len(two) == 5 and two == one
    assert json.loads((tmp_path / "generate" / "generate_report.json").read_text())["processes"] == 2

    # the main process tokenised (train and eval), the other read its cache
    ranks = [json.loads((tmp_path / f"tokenise-once-{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"encode_calls": 2, "examples": 12}, {"encode_calls": 0, "examples": 12}]

    # streamed data: each process read and encoded its own share (records 0, 2, ... and 1, 3, ...):
    # 5 steps of 2 pairs are rank 0's pass (micro-batches 2, 2, 2, 1) and the first of the next, and
    # rank 1's pass (2, 2, 2) and two of the next; a next pass is read whole through the buffer of 4
    ranks = [json.loads((tmp_path / f"run-stream-{r}.json").read_text()) for r in (0, 1)]
    assert [len(r["share"]) for r in ranks] == [7, 6] and not set(ranks[0]["share"]) & set(ranks[1]["share"])
    assert [r["encoded"] for r in ranks] == [14, 12]
    report = json.loads((tmp_path / "run-stream" / "data_report.json").read_text())
    assert (report[0]["dataset"], report[0]["records"], report[0]["examples"]) == ("train", 13, 13)
    assert [r["step"] for r in rows(tmp_path / "run-stream") if "loss" in r] == [1, 2, 3, 4, 5]
    # each process's own place in its share is in the checkpoint, and the resume continues from it
    state = json.loads((tmp_path / "run-stream" / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["stream_positions"] == [[0, 3], [1, 0]]
    full = load_file(tmp_path / "run-stream" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "run-stream-resumed" / "final" / "model.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)

    # rank 1 alone failed to write its part of step 2's checkpoint: both ranks stopped with
    # CheckpointError (none left waiting at a barrier), step-1 is intact and nothing of step 2 is left
    agree = tmp_path / "ckpt-agree" / "checkpoints"
    raised = [(tmp_path / f"ckpt-agree-{r}.txt").read_text() for r in (0, 1)]
    head = f"CheckpointError: could not write the checkpoint of step 2 to {agree / 'step-2'}: "
    tail = f". The previous checkpoint {agree / 'step-1'} is intact: free space and resume with " \
           "train.resume_from=latest"
    assert raised == [head + "another process failed to write its part" + tail, head + "No space left on device" + tail]
    assert sorted(p.name for p in agree.iterdir()) == ["step-1"] and checkpoint_problem(agree / "step-1") is None
    listed = json.loads((agree / "step-1" / "manifest.json").read_text())["files"]
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "trainer_state.json"} <= listed.keys()
    assert not (tmp_path / "ckpt-agree" / "final").exists()
