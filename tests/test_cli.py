"""The CLI verbs, in process (fast) and once through the installed entry point."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prefopt.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "prefopt" / "demo" / "data" / "dpo_en_demo.json"
TINY = ["data.max_length=64", "data.max_prompt_length=32", "train.progress_bar=false",
        "train.per_device_train_batch_size=4", "data.max_examples=12"]


def test_sft_then_dpo_then_eval_from_yaml_with_overrides(tiny_model_dir, tmp_path, capsys):
    sft_out, dpo_out, eval_out = tmp_path / "sft", tmp_path / "dpo", tmp_path / "eval"
    assert main(["sft", str(ROOT / "configs" / "sft.yaml"), f"model.name_or_path={tiny_model_dir}",
                 f"data.train={DATA}", "data.eval_split_size=4", f"output_dir={sft_out}",
                 "train.max_steps=2", *TINY]) == 0
    assert (sft_out / "final" / "model.safetensors").is_file()
    assert main(["dpo", str(ROOT / "configs" / "dpo.yaml"), f"model.name_or_path={sft_out / 'final'}",
                 f"data.train={DATA}", "data.eval_split_size=4", f"output_dir={dpo_out}",
                 "train.max_steps=2", "train.eval_steps=0", "train.save_steps=1", "loss.beta=0.2", *TINY]) == 0
    resolved = (dpo_out / "config.yaml").read_text()
    assert "beta: 0.2" in resolved and "max_steps: 2" in resolved
    assert sorted(p.name for p in (dpo_out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert main(["eval", str(ROOT / "configs" / "eval.yaml"), f"model.name_or_path={dpo_out / 'final'}",
                 f"reference.name_or_path={sft_out / 'final'}", f"data.train={DATA}", "data.eval_split_size=4",
                 f"output_dir={eval_out}", *TINY]) == 0
    result = json.loads((eval_out / "eval.json").read_text())
    assert result["reference"] == str(sft_out / "final")
    assert {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"} <= result["metrics"].keys()
    assert result["metrics"]["eval/rewards/margins"] != 0.0


def test_eval_refuses_to_compare_a_model_with_itself(tiny_model_dir, tmp_path, capsys):
    code = main(["eval", f"model.name_or_path={tiny_model_dir}", f"data.eval={DATA}", f"output_dir={tmp_path}"])
    assert code == 2 and "set reference.name_or_path" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["dpo", "train.learnig_rate=1"], "did you mean 'train.learning_rate'"),
    (["dpo", "nope.yaml"], "config file not found: nope.yaml"),
    (["dpo", "loss=dpoo"], "unknown loss 'dpoo'"),
    (["losses", "ipoo"], "did you mean 'ipo'"),
])
def test_user_errors_exit_2_with_one_clear_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_data_error_names_file_and_line(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"\n')
    assert main(["dpo", f"model.name_or_path={tiny_model_dir}", f"data.train={bad}", f"output_dir={tmp_path / 'o'}"]) == 2
    assert f"{bad}:2: malformed JSON" in capsys.readouterr().err


def test_listing_verbs(capsys):
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    assert "dpo" in out and "ipo" in out and "sft" in out and "Rafailov" in out
    assert main(["losses", "ipo"]) == 0
    assert "averaged" in capsys.readouterr().out
    assert main(["keys"]) == 0
    assert "train.learning_rate" in capsys.readouterr().out
    assert main(["formats"]) == 0
    assert "sharegpt" in capsys.readouterr().out


def test_demo_quick_through_the_installed_entry_point(tmp_path):
    exe = shutil.which("prefopt", path=str(Path(sys.executable).parent))
    assert exe, "the prefopt console script is not installed in this environment"
    run = subprocess.run([exe, "demo", "--quick", "--output-dir", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    for stage in ("base", "sft/final", "dpo/final"):
        assert (tmp_path / "demo" / stage / "config.json").is_file(), stage
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["results"]) == {"before (SFT)", "after (DPO)"}
    assert summary["results"]["before (SFT)"]["train"]["eval/rewards/margins"] == 0.0
    assert "rewards/accuracies" in run.stdout
