"""Reports people look at: report.html with its plots (opened in a real headless browser where
one is installed), TensorBoard event files holding the same numbers as metrics.jsonl, and
tracker names checked before a run."""
import base64
import json
import re
import shutil
import subprocess

import pytest

from prefopt import ConfigError, DPOConfig, DPOTrainer
from prefopt.cli import main

SHORT = dict(max_length=64, max_prompt_length=32, logging_steps=1, progress_bar=False,
             per_device_train_batch_size=2, learning_rate=1e-3)


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, demo_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:8], eval_dataset=demo_records[8:12],
               args=DPOConfig(output_dir=str(out), max_steps=4, eval_steps=2, report_to="tensorboard",
                              **SHORT)).train()
    return out


def images(page: str) -> list[bytes]:
    return [base64.b64decode(x) for x in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def test_run_ends_with_a_self_contained_report(run_dir):
    page = (run_dir / "report.html").read_text()
    pngs = images(page)
    assert len(pngs) == 6  # loss, rewards, margin, accuracy, grad norm, learning rate (no KL for DPO)
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    for title in ("loss", "rewards", "reward margin", "reward accuracy", "grad norm", "learning rate"):
        assert f"alt='{title}'" in page
    assert "Final metrics" in page and "Data: train" in page and "Configuration" in page
    assert "src='http" not in page and "<script" not in page  # nothing to fetch


def test_tensorboard_events_hold_the_logged_numbers(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run_dir / "logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in logged if "loss" in r}
    got = {e.step: e.value for e in acc.Scalars("loss")}
    assert got.keys() == train.keys() == {1, 2, 3, 4}
    assert all(got[k] == pytest.approx(train[k], rel=1e-6) for k in got)
    evals = {e.step for e in acc.Scalars("eval/loss")}
    assert evals == {2, 4}


def test_report_opens_in_a_headless_browser_with_its_plots(run_dir, tmp_path):
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no chromium installed (apt install chromium)")
    from PIL import Image

    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1300,1400", (run_dir / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1300, 1400)
    pixels = list(image.getdata())
    # matplotlib's first two series colours (C0 blue, C1 orange) drawn by the browser: the plots render
    def near(c, ref):
        return sum(abs(a - b) for a, b in zip(c, ref)) < 60
    assert sum(near(p, (31, 119, 180)) for p in pixels) > 200
    assert sum(near(p, (255, 127, 14)) for p in pixels) > 50
    assert sum(p != (255, 255, 255) for p in pixels) > 0.05 * len(pixels)


def test_report_html_can_be_turned_off_and_rewritten(tiny_model_dir, demo_records, tmp_path, capsys):
    out = tmp_path / "run"
    DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:4],
               args=DPOConfig(output_dir=str(out), max_steps=1, report_html=False, **SHORT)).train()
    assert not (out / "report.html").exists()
    assert main(["report", str(out)]) == 0 and (out / "report.html").is_file()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("report_to, message", [("tensorbord", "did you mean 'tensorboard'"),
                                                (["comet_ml"], "needs the comet_ml package")])
def test_tracker_names_are_checked_before_the_run(tiny_model_dir, demo_records, tmp_path, report_to, message):
    with pytest.raises(ConfigError, match=message):
        DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:4],
                   args=DPOConfig(output_dir=str(tmp_path), max_steps=1, report_to=report_to, **SHORT)).train()


def wandb_history(run_file) -> list[dict]:
    """History rows of an offline W&B run file (a LevelDB-style log of protobuf records: a 7-byte
    header, then 32 KiB blocks of chunks, each with a 7-byte crc/length/kind header)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, chunk, rows = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            chunk = b""
    return rows


def logged_losses(run_dir) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def tracked_run(tiny_model_dir, demo_records, tmp_path, monkeypatch, tracker):
    """A run with no network, no credentials and a clean environment: the tracker must log
    offline under OUTPUT_DIR/logs and leave the working directory alone."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:8],
               args=DPOConfig(output_dir=str(out), max_steps=3, report_to=[tracker], **SHORT)).train()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == ["run"]  # nothing in the cwd
    return out


def test_wandb_logs_offline_without_credentials(tiny_model_dir, demo_records, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    out = tracked_run(tiny_model_dir, demo_records, tmp_path, monkeypatch, "wandb")
    (run_file,) = (out / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    history = [row for row in wandb_history(run_file) if "loss" in row]
    expected = logged_losses(out)
    assert [row["_step"] for row in history] == sorted(expected) == [1, 2, 3]
    assert all(row["loss"] == pytest.approx(expected[row["_step"]], rel=1e-6) for row in history)


def test_mlflow_logs_to_a_store_under_the_run(tiny_model_dir, demo_records, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    out = tracked_run(tiny_model_dir, demo_records, tmp_path, monkeypatch, "mlflow")
    client = mlflow.MlflowClient(mlflow.get_tracking_uri())
    assert str(out / "logs") in mlflow.get_tracking_uri()
    (experiment,) = [e for e in client.search_experiments() if e.name == "run"]
    (run,) = client.search_runs([experiment.experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    expected = logged_losses(out)
    assert history.keys() == expected.keys() == {1, 2, 3}
    assert all(history[k] == pytest.approx(expected[k], rel=1e-6) for k in history)
    assert run.data.params["data.max_length"] == "64" and "0.1" in run.data.params["loss"]
