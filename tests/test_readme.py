"""The README is executable documentation: its snippets run as written, its tables are current."""
import math
import re

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_quick_start_is_exactly_two_commands():
    block = README.split("## Quick start", 1)[1].split("```")[1]
    assert block.split() == ["make", "demo", "make", "test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_python_api_snippet_runs_as_written(tiny_model_dir, tmp_path, monkeypatch):
    # The snippet starts from the demo's SFT model: put the tiny test model where it looks.
    (tmp_path / "runs" / "demo" / "sft").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "sft" / "final").symlink_to(tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_blocks()[0], "README.md", "exec"), namespace)
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "metrics.jsonl").read_text().count('"step": 20') >= 1


def test_losses_snippet_value_is_the_one_claimed():
    namespace: dict = {}
    exec(python_blocks()[1], namespace)
    assert abs(namespace["out"].losses.item() - math.log(1 + math.exp(-0.3))) < 1e-6
    assert "0.5544" in python_blocks()[1]


def test_loss_table_is_generated_from_the_registry():
    from prefopt.cli import losses_markdown

    table = README.split("<!-- losses-table:start", 1)[1].split("-->", 1)[1].split("<!-- losses-table:end -->")[0]
    assert table.strip() == losses_markdown().strip(), "run `prefopt losses --markdown` and paste it into README.md"


def test_extra_loss_snippet_runs_after_the_api_snippet(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "runs" / "demo" / "sft").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "sft" / "final").symlink_to(tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    api = python_blocks()[0].replace("trainer.train()", "").replace("trainer.save_model()", "")
    namespace: dict = {}
    exec(compile(api, "README.md", "exec"), namespace)
    exec(compile(python_blocks()[2], "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert set(trainer._extra_losses) == {"penalty"}
    job = trainer.setup()
    batch = next(iter(job.train_loader))
    step = job.objective.forward(job.model, batch, job.objective.units(batch))
    assert step.extras["penalty"].item() == pytest.approx(0.01 * -step.inputs.policy_chosen_logps.mean().item())
