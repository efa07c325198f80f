"""The command line respects a person's habits: a typo in an override is blamed on the
override (not the YAML file) with the closest key, a flat TRL name points to its section,
--key=value and --key value work, messages carry one prefix, and a closed pipe is no traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

from prefopt.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, hint", [("train.learnig_rate=1e-5", "did you mean 'train.learning_rate'?"),
                                            ("learning_rate=1e-5", "did you mean 'train.learning_rate'?"),
                                            ("dataset_num_proc=2", "did you mean 'data.num_proc'?")])
def test_an_override_typo_is_blamed_on_the_override(override, hint, capsys):
    assert main(["dpo", "configs/dpo.yaml", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prefopt dpo: error: override '{override}': unknown config key") and hint in err
    assert "configs/dpo.yaml" not in err


def test_dashed_overrides_are_overrides(tmp_path, capsys, monkeypatch):
    seen = {}
    import prefopt.cli as cli
    monkeypatch.setitem(cli.VERBS, "dpo", lambda ns: seen.setdefault("config", cli._config(ns, {"loss": "dpo"})) and 0)
    assert main(["dpo", "configs/dpo.yaml", "--train.max_steps=3", "--train.seed", "7", f"--output_dir={tmp_path}"]) == 0
    config = seen["config"]
    assert (config.train.max_steps, config.train.seed, config.output_dir) == (3, 7, str(tmp_path))
    with pytest.raises(SystemExit):
        main(["losses", "--train.max_steps=3"])  # a verb without overrides
    assert "unrecognized arguments: --train.max_steps=3" in capsys.readouterr().err


def test_messages_carry_one_prefix(capsys):
    assert main(["eval", "data.eval=none.jsonl", "model.name_or_path=x", "loss=ipo"]) == 2
    err = capsys.readouterr().err
    assert err.count("prefopt eval:") == 1


def test_a_closed_pipe_is_not_a_traceback():
    proc = subprocess.run(f"{sys.executable} -m prefopt losses | true", shell=True, cwd=ROOT,  # reader gone at once
                          capture_output=True, text=True)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_the_console_line_has_grad_norm_and_eta_and_evaluations_are_printed(tiny_model_dir, demo_records,
                                                                            tmp_path, caplog):
    import re

    from prefopt import DPOConfig, DPOTrainer

    caplog.set_level("INFO", logger="prefopt")
    DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:8], eval_dataset=demo_records[8:12],
               args=DPOConfig(output_dir=str(tmp_path / "run"), max_steps=4, eval_steps=2, logging_steps=2,
                              max_length=64, max_prompt_length=32, per_device_train_batch_size=2,
                              progress_bar=True)).train()
    steps = [m for m in caplog.messages if m.startswith("step ")]
    assert len(steps) == 2
    assert all(re.search(r"grad norm [0-9.e+-]+ lr .* ETA \d+:\d\d:\d\d$", m) for m in steps)
    assert steps[-1].endswith("ETA 0:00:00")
    evals = [i for i, m in enumerate(caplog.messages) if m.startswith("eval at step")]  # a 2-line table
    assert [caplog.messages[i].split(" (")[0] for i in evals] == ["eval at step 2", "eval at step 4"]
    assert all(re.search(r"\): loss +rewards/accuracies +rewards/margins", caplog.messages[i]) for i in evals)
    assert all(re.fullmatch(r" +-?[0-9.e+-]+( +-?[0-9.e+-]+)+", caplog.messages[i + 1]) for i in evals)
    assert "evaluating at step 2 (1 batches per process)..." in caplog.messages
