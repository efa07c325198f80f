"""Never lose work: a run killed with SIGKILL (between steps, or while writing a checkpoint) or
stopped with SIGTERM resumes to the same weights, bit for bit, as a run never interrupted;
checkpoints are atomic with a verified manifest; a full disk keeps the previous checkpoint;
another run's output directory is refused; a resume names what differs; non-finite steps are
skipped and counted.

The kill tests run the real CLI in subprocesses (one thread each, so every run computes in
the same order) and kill them for real."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt import ConfigError, DPOConfig, DPOTrainer
from prefopt.train.checkpoint import CheckpointError, checkpoint_problem, list_checkpoints
from prefopt.train.loop import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "prefopt" / "demo" / "data" / "dpo_en_demo.json"
STEPS = 6
SHORT = dict(max_length=64, max_prompt_length=32, logging_steps=1, progress_bar=False,
             per_device_train_batch_size=2, learning_rate=1e-3)


def cli_args(model_dir, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "prefopt", "dpo", f"model.name_or_path={model_dir}", f"data.train={DATA}",
            f"output_dir={out}", "data.max_examples=12", "data.max_length=64", "data.max_prompt_length=32",
            f"train.max_steps={STEPS}", "train.save_steps=1", "train.logging_steps=1", "train.learning_rate=1e-3",
            "train.per_device_train_batch_size=2", "train.progress_bar=false", "train.report_html=false", *extra]


def start(model_dir, out: Path, *extra, fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("PREFOPT_FAULT", None)
    if fault:
        env["PREFOPT_FAULT"] = fault
    return subprocess.Popen(cli_args(model_dir, out, *extra), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def final_weights(out: Path) -> dict:
    return load_file(out / "final" / "model.safetensors")


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.endswith("}")]


@pytest.fixture(scope="module")
def baseline(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("never") / "baseline"
    rc, err = finish(start(tiny_model_dir, out))
    assert rc == 0, err[-2000:]
    return final_weights(out)


def resume_and_compare(tiny_model_dir, out: Path, baseline: dict) -> str:
    rc, err = finish(start(tiny_model_dir, out, "train.resume_from=latest"))
    assert rc == 0, err[-2000:]
    got = final_weights(out)
    assert got.keys() == baseline.keys() and all(torch.equal(got[k], baseline[k]) for k in got)
    assert logged_steps(out) == list(range(1, STEPS + 1))  # the resumed run keeps the steps up to its checkpoint
    return err


@pytest.mark.parametrize("fault, resumed_at", [("kill:checkpoint:3", 2), ("kill:step:5", 4)])
def test_sigkill_at_a_fault_point_resumes_to_the_same_weights(tiny_model_dir, baseline, tmp_path, fault, resumed_at):
    out = tmp_path / "run"
    rc, _ = finish(start(tiny_model_dir, out, fault=fault))
    assert rc == -signal.SIGKILL
    # killed mid-write: the half-written step-3 is a .tmp folder, never a checkpoint
    assert [p.name for p in list_checkpoints(out)][-1] == f"step-{resumed_at}"
    if fault.startswith("kill:checkpoint"):
        assert (out / "checkpoints" / ".tmp-step-3").is_dir()
    err = resume_and_compare(tiny_model_dir, out, baseline)
    assert f"resumed from {out / 'checkpoints' / f'step-{resumed_at}'} (step {resumed_at} of {STEPS})" in err
    assert not (out / "checkpoints" / ".tmp-step-3").exists()


def test_sigkill_at_a_random_moment_resumes_to_the_same_weights(tiny_model_dir, baseline, tmp_path):
    out = tmp_path / "run"
    after = random.Random(os.getpid()).randint(2, STEPS - 2)  # a step chosen at random (step-1 saved by then)
    proc = start(tiny_model_dir, out)
    deadline = time.time() + 120
    while after not in logged_steps(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.kill()
    rc, _ = finish(proc)
    assert rc == -signal.SIGKILL, f"the run ended before the kill (after step {after})"
    assert all(checkpoint_problem(p) is None for p in list_checkpoints(out))
    resume_and_compare(tiny_model_dir, out, baseline)


def test_sigterm_saves_a_checkpoint_and_exits_with_its_code(tiny_model_dir, baseline, tmp_path):
    out = tmp_path / "run"
    proc = start(tiny_model_dir, out, "train.save_steps=0")  # no periodic checkpoints: only the signal's
    deadline = time.time() + 120
    while 2 not in logged_steps(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    (checkpoint,) = list_checkpoints(out)
    step = int(checkpoint.name.split("-")[1])
    assert 2 <= step < STEPS
    assert f"stopped by SIGTERM at step {step} of {STEPS}: checkpoint saved in {checkpoint}" in err
    assert "Traceback" not in err
    rc, err = finish(start(tiny_model_dir, out, "train.resume_from=latest", "train.save_steps=0"))
    assert rc == 0, err[-2000:]
    got = final_weights(out)
    assert all(torch.equal(got[k], baseline[k]) for k in baseline)


# ----------------------------------------------------------------------------- in process

def run(tiny_model_dir, records, out, **keys):
    return DPOTrainer(str(tiny_model_dir), None, train_dataset=records, args=DPOConfig(output_dir=str(out),
                                                                                     **{**SHORT, **keys}))


def test_another_runs_directory_is_refused_and_a_resume_names_what_differs(tiny_model_dir, demo_records, tmp_path,
                                                                          caplog):
    out = tmp_path / "run"
    run(tiny_model_dir, demo_records[:8], out, max_steps=4, save_steps=2).train()
    with pytest.raises(ConfigError, match=r"holds another run \(checkpoints step-2..step-4, final/\). Resume it "
                                          r"with train.resume_from=latest.*overwrite_output_dir=true"):
        run(tiny_model_dir, demo_records[:8], out, max_steps=2).train()
    assert [p.name for p in list_checkpoints(out)] == ["step-2", "step-4"]  # untouched
    with pytest.raises(ConfigError) as e:
        run(tiny_model_dir, demo_records[:8], out, max_steps=6, beta=0.5, per_device_train_batch_size=4,
            resume_from="latest").train()
    message = str(e.value)
    assert f"{out / 'checkpoints' / 'step-4'} is another run's checkpoint" in message
    assert "train.per_device_train_batch_size: checkpoint 2, now 4" in message and "'beta': 0.5" in message
    caplog.set_level("INFO", logger="prefopt")
    run(tiny_model_dir, demo_records[:8], out, max_steps=6, save_steps=2, learning_rate=2e-3,
        resume_from="latest").train()
    assert f"resumed from {out / 'checkpoints' / 'step-4'} (step 4 of 6); changed since: " \
           f"train.learning_rate: checkpoint 0.001, now 0.002" in caplog.text
    run(tiny_model_dir, demo_records[:8], out, max_steps=1, overwrite_output_dir=True).train()
    assert list_checkpoints(out) == [] and (out / "final").is_dir()
    assert logged_steps(out) == [1]


def test_latest_falls_back_past_a_damaged_checkpoint(tiny_model_dir, demo_records, tmp_path, caplog):
    out = tmp_path / "run"
    run(tiny_model_dir, demo_records[:8], out, max_steps=3, save_steps=1).train()
    for p in list_checkpoints(out):
        manifest = json.loads((p / "manifest.json").read_text())["files"]
        assert {"model.safetensors", "optimizer.bin", "trainer_state.json", "config.yaml"} <= manifest.keys()
        assert checkpoint_problem(p) is None
    weights = out / "checkpoints" / "step-3" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit: same size, other content
    weights.write_bytes(bytes(data))
    assert checkpoint_problem(weights.parent) == "model.safetensors does not match its checksum"
    (out / "checkpoints" / "step-2" / "optimizer.bin").unlink()
    with pytest.raises(CheckpointError, match="step-2 is damaged: optimizer.bin is missing"):
        run(tiny_model_dir, demo_records[:8], tmp_path / "x", max_steps=3,
            resume_from=str(out / "checkpoints" / "step-2")).train()
    caplog.set_level("INFO", logger="prefopt")
    run(tiny_model_dir, demo_records[:8], out, max_steps=3, save_steps=1, resume_from="latest").train()
    assert "step-3 is damaged (model.safetensors does not match its checksum); falling back" in caplog.text
    assert "step-2 is damaged (optimizer.bin is missing)" in caplog.text
    assert f"resumed from {out / 'checkpoints' / 'step-1'} (step 1 of 3)" in caplog.text


def test_a_full_disk_keeps_the_previous_checkpoint(tiny_model_dir, demo_records, tmp_path, monkeypatch):
    import accelerate.checkpointing as ckpt

    real, calls = ckpt.save, []

    def save(obj, f, *args, **kwargs):  # accelerate writes every file of a checkpoint through this
        calls.append(str(f))
        if "step-2" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save", save)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"could not write the checkpoint of step 2 to .*step-2: No space left "
                                              r"on device. The previous checkpoint .*step-1 is intact"):
        run(tiny_model_dir, demo_records[:8], out, max_steps=3, save_steps=1).train()
    assert any("step-2" in c for c in calls)
    assert [p.name for p in list_checkpoints(out)] == ["step-1"] and checkpoint_problem(out / "checkpoints" / "step-1") is None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]  # the partial write is gone
    monkeypatch.setattr(ckpt, "save", real)
    run(tiny_model_dir, demo_records[:8], out, max_steps=3, save_steps=1, resume_from="latest").train()
    assert (out / "final" / "model.safetensors").is_file()


def faulty(nan_loss: set[int], nan_grad: set[int] = frozenset()):
    """An extra loss term: 0 with a NaN added on the forwards in ``nan_loss`` (a non-finite
    loss, finite gradients), sqrt(0 * x) on those in ``nan_grad`` (a finite loss of 0 whose
    gradient is NaN); 0 otherwise. Forwards are counted from 1 (one per step here)."""
    calls = {"n": 0}

    def loss(step):
        calls["n"] += 1
        zero = step.policy.logps.sum() * 0
        if calls["n"] in nan_grad:
            return zero.sqrt()
        return zero + (float("nan") if calls["n"] in nan_loss else 0.0)
    return loss


def test_non_finite_steps_are_skipped_and_counted(tiny_model_dir, demo_records, tmp_path):
    out = tmp_path / "run"
    trainer = DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:8],
                         extra_losses={"fault": faulty({2}, {3})},
                         args=DPOConfig(output_dir=str(out), max_steps=5, **SHORT))
    trainer.train()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 2, 2]
    assert ["loss" in r for r in rows] == [True, False, False, True, True]  # skipped windows logged no loss
    assert [r["learning_rate"] for r in rows] == pytest.approx([8e-4, 6e-4, 4e-4, 2e-4, 0.0])  # the schedule went on
    assert {int(v["step"]) for v in trainer.job.optimizer.state.values()} == {3}  # AdamW updated on 3 of 5 steps
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_non_finite_steps_in_a_row_stop_with_a_checkpoint(tiny_model_dir, demo_records, tmp_path):
    out = tmp_path / "run"
    initial = load_file(tiny_model_dir / "model.safetensors")
    with pytest.raises(NonFiniteLossError, match=r"steps 1..2 in a row had a non-finite loss or gradient "
                                                 r"\(train.max_consecutive_skips=2\); stopped with a checkpoint in "
                                                 r".*step-2. Likely causes: fp16 overflow"):
        DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:8], extra_losses={"fault": faulty({1, 2})},
                   args=DPOConfig(output_dir=str(out), max_steps=5, max_consecutive_skips=2, **SHORT)).train()
    saved = load_file(out / "checkpoints" / "step-2" / "model.safetensors")
    assert all(torch.equal(saved[k], initial[k]) for k in saved)  # no update was made


def fp16_scaler(monkeypatch, init_scale: float) -> None:
    """accelerate's fp16 path, which it builds on GPUs only, on CPU: a real GradScaler; backward
    scales the loss, clip_grad_norm_ unscales first (native_amp), the optimizer steps through the
    scaler, save_state writes scaler.pt. Autocast stays off: the arithmetic is float32, so a run
    compares exactly with a float32 run. Backoff 2^-100 and no growth: one overflow takes the scale
    from init_scale to init_scale * 2^-100, where it stays."""
    import accelerate
    from accelerate.utils import AutocastKwargs

    real = accelerate.Accelerator

    class WithScaler(real):  # prefopt.trainer imports accelerate.Accelerator at setup
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.native_amp, self.autocast_handler = True, AutocastKwargs(enabled=False)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, backoff_factor=2.0 ** -100,
                                               growth_interval=1 << 30)

    monkeypatch.setattr(accelerate, "Accelerator", WithScaler)


def rows_of(out: Path) -> list[dict]:  # tokens_per_second is a timing
    return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_second"}
            for x in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint_weights(out: Path, step: int) -> dict:
    return load_file(out / "checkpoints" / f"step-{step}" / "model.safetensors")


def same(a: dict, b: dict) -> bool:
    return bool(a) and all(torch.equal(a[k], b[k]) for k in a)


def test_an_fp16_overflow_is_skipped_counted_and_not_a_fault(tiny_model_dir, demo_records, tmp_path, monkeypatch,
                                                             caplog):
    """A loss scale of 2^127 overflows the first backward (on this fixture float32 overflows from
    2^125 up: its intermediate gradients reach 8-16, its parameter gradients ~0.2): no update, the
    scale lowered to 2^27, the step counted in skipped_steps but not toward max_consecutive_skips
    (1 here). Scaling and unscaling by a power of two is exact, so from there the run is, bit for
    bit, a float32 run whose first step was skipped for a NaN loss (the same AdamW state, schedule
    position and weights): the same weights after every step, losses, grad norms (clipped after
    unscaling) and learning rates. A resume restores the loss scale (scaler.pt): no second overflow."""
    initial = load_file(tiny_model_dir / "model.safetensors")
    keys = dict(max_steps=4, save_steps=1, **SHORT)
    fp32, fp16 = tmp_path / "fp32", tmp_path / "fp16"
    DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:8], extra_losses={"fault": faulty({1})},
               args=DPOConfig(output_dir=str(fp32), **keys)).train()
    fp16_scaler(monkeypatch, 2.0 ** 127)
    caplog.clear()
    trainer = DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:8],
                         extra_losses={"fault": faulty(set())},
                         args=DPOConfig(output_dir=str(fp16), mixed_precision="fp16", max_consecutive_skips=1, **keys))
    trainer.train()  # max_consecutive_skips=1 and step 1 skipped, yet no NonFiniteLossError: an overflow is no fault
    assert trainer.job.accelerator.scaler.get_scale() == 2.0 ** 27
    assert "step 1 skipped: fp16 gradient overflow, the loss scale is lowered (1 skipped so far)" in caplog.text
    assert caplog.text.count("skipped:") == 1
    assert {int(v["step"]) for v in trainer.job.optimizer.state.values()} == {3}  # AdamW stepped on steps 2-4
    rows = rows_of(fp16)
    assert [r["skipped_steps"] for r in rows] == [1, 1, 1, 1]
    assert ["loss" in r for r in rows] == [False, True, True, True]
    assert rows == rows_of(fp32)  # every logged number, exactly
    assert same(checkpoint_weights(fp16, 1), initial)  # the overflowed step changed nothing
    assert not same(checkpoint_weights(fp16, 2), initial)
    for step in (2, 3, 4):
        assert same(checkpoint_weights(fp16, step), checkpoint_weights(fp32, step)), step
    assert (fp16 / "checkpoints" / "step-1" / "scaler.pt").is_file()

    caplog.clear()
    resumed = DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:8],
                         extra_losses={"fault": faulty(set())},
                         args=DPOConfig(output_dir=str(fp16), mixed_precision="fp16", max_consecutive_skips=1,
                                        resume_from=str(fp16 / "checkpoints" / "step-2"), **keys))
    resumed.train()
    assert "skipped:" not in caplog.text  # the scale came back from scaler.pt: 2^127 would overflow again
    assert resumed.job.accelerator.scaler.get_scale() == 2.0 ** 27
    assert rows_of(fp16) == rows_of(fp32) and same(final_weights(fp16), final_weights(fp32))


def test_a_non_finite_loss_under_fp16_makes_no_update(tiny_model_dir, demo_records, tmp_path, monkeypatch):
    """The scaler checks the gradient only: a NaN loss whose gradient is finite (faulty's NaN is a
    constant) passed its check and was applied while the step was reported skipped. Now no update,
    the loss scale unchanged, and it counts toward max_consecutive_skips like any non-finite step."""
    fp16_scaler(monkeypatch, 2.0 ** 16)
    out = tmp_path / "run"
    trainer = DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:8], extra_losses={"fault": faulty({2})},
                         args=DPOConfig(output_dir=str(out), max_steps=4, save_steps=1, mixed_precision="fp16",
                                        max_consecutive_skips=1, **SHORT))
    with pytest.raises(NonFiniteLossError, match=r"steps 2..2 in a row had a non-finite loss or gradient"):
        trainer.train()
    assert same(checkpoint_weights(out, 2), checkpoint_weights(out, 1))
    assert not same(checkpoint_weights(out, 1), load_file(tiny_model_dir / "model.safetensors"))
    assert trainer.job.accelerator.scaler.get_scale() == 2.0 ** 16
    assert {int(v["step"]) for v in trainer.job.optimizer.state.values()} == {1}


def test_a_skipped_step_leaves_no_trace_in_a_running_statistic(tiny_model_dir, demo_records, tmp_path):
    """BCO's running reward mean folds in each batch during forward; a skipped (NaN) step must
    not make it NaN for the rest of the run."""
    trainer = DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:8], loss="bco_pair",
                         extra_losses={"fault": faulty({2})},
                         args=DPOConfig(output_dir=str(tmp_path / "run"), max_steps=4, **SHORT))
    trainer.train()
    (state,) = trainer.job.objective.state_dict().values()
    assert state["count"] == 3 * 2 * 2  # 3 updated steps x 2 pairs x (chosen, rejected): step 2 not counted
    assert torch.isfinite(state["mean"])


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tiny_model_dir, demo_records, tmp_path, caplog):
    out = tmp_path / "run"
    run(tiny_model_dir, demo_records[:8], out, max_steps=4, save_steps=1, save_total_limit=2).train()
    assert [p.name for p in list_checkpoints(out)] == ["step-3", "step-4"]
    caplog.set_level("INFO", logger="prefopt")
    run(tiny_model_dir, demo_records[:8], out, max_steps=4, save_steps=1, save_total_limit=2, learning_rate=5e-4,
        resume_from=str(out / "checkpoints" / "step-3")).train()
    assert "checkpoints after step 3 (step-4) moved to" in caplog.text
    assert [p.name for p in list_checkpoints(out)] == ["step-3", "step-4"]  # step-4 is the new run's
    assert (out / "checkpoints" / "superseded" / "step-4").is_dir()
    new = json.loads((out / "checkpoints" / "step-4" / "config.yaml").read_text().split("learning_rate: ")[1]
                     .split("\n")[0])
    assert new == 5e-4


def test_max_consecutive_skips_must_be_positive(tiny_model_dir, demo_records, tmp_path):
    with pytest.raises(ConfigError, match="max_consecutive_skips must be >= 1"):
        run(tiny_model_dir, demo_records[:4], tmp_path / "r", max_steps=1, max_consecutive_skips=0).train()
