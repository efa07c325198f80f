"""The command line respects a person's habits: a typo in an override is blamed on the
override (not the YAML file) with the closest key (a flat name's with its key), a flat TRL name
is routed to its key, --config and --key=value and --key value work, a key in a YAML file is
blamed on its file and line, --version answers, messages carry one prefix, every exit status is
the documented one, and a closed pipe is no traceback."""
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import prefopt
import prefopt.cli as cli
from prefopt.cli import main
from prefopt.errors import ConfigError, DataError
from prefopt.train.loop import Interrupted, NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, hint", [("train.learnig_rate=1e-5", "did you mean 'train.learning_rate'?"),
                                            ("learnig_rate=1e-5", "did you mean 'learning_rate' (train.learning_rate)?"),
                                            ("dataset_num_prc=2", "did you mean 'dataset_num_proc' (data.num_proc)?"),
                                            ("bta=0.2", "did you mean 'beta' (loss.beta)?")])
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


def test_a_closed_pipe_is_not_a_traceback_and_exits_141():
    proc = subprocess.run(f"set -o pipefail; {sys.executable} -m prefopt losses | true", shell=True, cwd=ROOT,
                          executable="/bin/bash", capture_output=True, text=True)  # the reader is gone at once
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
    assert proc.returncode == 141


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


def parsed(monkeypatch, argv: list[str]):
    """The config `prefopt dpo ARGV...` would train with (the verb itself is not run)."""
    seen = {}
    monkeypatch.setitem(cli.VERBS, "dpo", lambda ns: seen.setdefault("config", cli._config(ns, {"loss": "dpo"})) and 0)
    assert main(["dpo", *argv]) == 0
    return seen["config"]


@pytest.mark.parametrize("argv", [["configs/dpo.yaml"], ["--config", "configs/dpo.yaml"],
                                  ["--config=configs/dpo.yaml"], ["--train.seed", "7", "configs/dpo.yaml"]])
def test_the_config_is_positional_or_given_with_config(monkeypatch, argv):
    config = parsed(monkeypatch, argv)
    shipped = yaml.safe_load((ROOT / "configs" / "dpo.yaml").read_text())
    assert config.model.name_or_path == shipped["model"]["name_or_path"]
    assert config.train.seed == (7 if "--train.seed" in argv else shipped["train"].get("seed", 42))


def test_flat_trl_names_are_routed_to_their_keys(monkeypatch):
    config = parsed(monkeypatch, ["--config", "configs/dpo.yaml", "--learning_rate", "3e-5", "--train.max_steps=3",
                                  "per_device_train_batch_size=2", "--beta", "0.25", "--bf16", "--max_length=77",
                                  "--warmup_steps", "-1", "ref_model=some/ref", "--ld_alpha=0.5"])
    assert config.train.learning_rate == 3e-5 and config.train.max_steps == 3
    assert config.train.per_device_train_batch_size == 2 and config.train.warmup_steps == -1
    assert config.loss[0].params["beta"] == 0.25 and config.loss[0].modifiers == {"ld_alpha": 0.5}
    assert config.train.mixed_precision == "bf16" and config.data.max_length == 77
    assert config.reference.name_or_path == "some/ref"
    # the loss a flat parameter belongs to is the one the config has by then
    ipo = parsed(monkeypatch, ["loss=ipo", "beta=0.5", "learning_rate=1e-5"])
    assert [(t.name, t.params["beta"]) for t in ipo.loss] == [("ipo", 0.5)] and ipo.train.learning_rate == 1e-5


def test_trl_field_names_on_the_command_line(monkeypatch, capsys):
    """`trl dpo`'s flags: TRL field names go through the same table as DPOConfig's keywords."""
    config = parsed(monkeypatch, ["configs/dpo.yaml", "--loss_type", "[sigmoid, sft]", "--eval_strategy", "epoch",
                                  "--precompute_ref_log_probs", "--dataset_num_proc=2", "--bf16", "false",
                                  "--sync_ref_model", "--ref_model_sync_steps", "64", "--report_to", "none",
                                  "--gradient_checkpointing"])
    assert [t.name for t in config.loss] == ["dpo", "sft"] and config.train.eval_strategy == "epoch"
    assert (config.reference.strategy, config.data.num_proc, config.train.mixed_precision) == (
        "precomputed", 2, "no")
    assert (config.reference.sync_steps, config.reference.sync_alpha) == (64, 0.6)
    assert config.train.report_to == [] and config.model.gradient_checkpointing is True
    lora = parsed(monkeypatch, ["--model_name_or_path", "org/m", "--use_peft", "--lora_r", "8", "--lora_alpha", "16",
                                "--dataset_name", "org/data"])
    assert (lora.model.name_or_path, lora.model.lora, lora.data.train) == ("org/m", {"r": 8, "lora_alpha": 16},
                                                                          "org/data")
    flag_then_file = parsed(monkeypatch, ["--use_peft", "configs/dpo.yaml"])  # the file is the config, not a value
    assert flag_then_file.model.lora == {} and flag_then_file.data.train is not None
    assert main(["dpo", "configs/dpo.yaml", "--use_liger_kernel"]) == 2
    assert ("override 'use_liger_kernel=true': use_liger_kernel=True is not supported by prefopt: model.lm_head: "
            "fused") in capsys.readouterr().err


def test_a_flat_loss_parameter_of_a_mixed_objective_asks_for_its_index(capsys):
    assert main(["dpo", "loss=[dpo, sft]", "--beta", "0.2"]) == 2
    assert ("override 'beta=0.2': 'beta' is a parameter of loss 'dpo', but the objective has 2 losses; "
            "address one as loss.<index>.beta") in capsys.readouterr().err
    assert main(["dpo", "--bf16", "maybe"]) == 2  # a flag's value that is no bool is refused
    assert "override 'bf16=maybe': bf16: expected bool" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["configs/dpo.yaml", "--config", "configs/sft.yaml"],
     "the config is given twice: 'configs/dpo.yaml' and --config 'configs/sft.yaml'; give one"),
    (["configs/dpo.yaml", "configs/sft.yaml"], "two config files, 'configs/dpo.yaml' and 'configs/sft.yaml'"),
    (["--config", "a.yaml", "--config=b.yaml"], "--config given twice: 'a.yaml' and 'b.yaml'"),
    (["--config"], "--config needs a file"),
])
def test_a_command_line_that_cannot_be_read_exits_2(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["dpo", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: prefopt dpo") and f"prefopt dpo: error: {message}" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"prefopt {prefopt.__version__}\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_yaml_key_error_names_the_file_and_line(tmp_path, capsys):
    from prefopt.config import load_config

    bad = write(tmp_path / "bad.yaml", "# a run\noutput_dir: out\nmodel:\n  name_or_path: m\ndata:\n"
                                       "  max_length: 64\ntrain:\n  learnig_rate: 1e-5\n")
    assert main(["dpo", str(bad)]) == 2
    assert capsys.readouterr().err == (f"prefopt dpo: error: {bad}:8: unknown config key 'train.learnig_rate' "
                                       f"(did you mean 'train.learning_rate'?); `prefopt keys` lists them all\n")
    cases = {"data:\n  layout: pakced\n": (2, "data.layout: 'pakced' is not one of ['auto', 'padded', 'packed', "
                                                 "'shared'] (did you mean 'packed'?)"),
             "train:\n  seed: 1\n  max_steps: ten\n": (3, "train.max_steps: expected int, got 'ten'"),
             "data: {max_length: 64, max_prompt_length: [1]}\n": (1, "data.max_prompt_length: expected int"),
             "loss:\n  - dpo\n  - name: sft\n    weight: heavy\n": (4, "loss[1].weight: expected float"),
             "loss:\n  - dpo\n  - {name: ipo, beta: -1}\n": (3, "loss 'ipo': beta=-1.0 must be > 0"),
             "model: m\n": (1, "model: expected a mapping, got 'm'")}
    for text, (line, message) in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(write(tmp_path / "c.yaml", text))
        assert str(err.value).startswith(f"{tmp_path / 'c.yaml'}:{line}: {message}"), (text, str(err.value))


def test_a_key_from_a_base_file_names_the_base_file_and_its_line(tmp_path):
    from prefopt.config import load_config

    write(tmp_path / "base.yaml", "output_dir: out\ndata:\n  max_length: 64\n  layout: pakced\n"
                                  "train: {seed: 1, max_steps: 2}\n")
    (tmp_path / "sub").mkdir()
    child = write(tmp_path / "sub" / "child.yaml", "base: ../base.yaml\ntrain:\n  max_steps: ten\n")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'sub' / '..' / 'base.yaml'}:4: data.layout: 'pakced'"):
        load_config(child)
    # the child overrides the base's key: the child's line; the base's other keys keep theirs
    write(tmp_path / "base.yaml", "output_dir: out\ndata:\n  layout: packed\ntrain: {seed: 1, max_steps: 2}\n")
    with pytest.raises(ConfigError, match=rf"^{child}:3: train.max_steps: expected int, got 'ten'"):
        load_config(child)
    write(tmp_path / "base.yaml", "output_dir: out\ndata:\n  layout: packed\ntrain: {seed: x, max_steps: 2}\n")
    write(child, "base: ../base.yaml\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'sub' / '..' / 'base.yaml'}:4: train.seed: expected int"):
        load_config(child)
    # a key the child replaces (a list, a value, the loss) takes its lines from the child alone
    write(tmp_path / "base.yaml", "loss:\n  name: dpo\n  beta: 0.1\n")
    write(child, "base: ../base.yaml\n\nloss: {name: ipo, beta: -2}\n")
    with pytest.raises(ConfigError, match=rf"^{child}:3: loss 'ipo': beta"):
        load_config(child)


def test_a_bad_value_from_an_override_is_the_overrides_not_the_files(tmp_path, capsys):
    config = write(tmp_path / "c.yaml", "train:\n  max_steps: 3\n")
    assert main(["dpo", str(config), "--max_steps", "ten"]) == 2
    assert capsys.readouterr().err == ("prefopt dpo: error: override 'max_steps=ten': train.max_steps: "
                                       "expected int, got 'ten'\n")
    assert main(["dpo", str(config), "loss.beta=-1"]) == 2
    assert capsys.readouterr().err.startswith("prefopt dpo: error: override 'loss.beta=-1': loss 'dpo': beta")


def raising(error: BaseException):
    def verb(ns):
        raise error
    return verb


@pytest.mark.parametrize("error, code", [
    (ConfigError("bad key"), 2), (DataError("data.jsonl:3", "no prompt"), 2),
    (NonFiniteLossError("steps 1..5 in a row had a non-finite loss"), 1),
    (Interrupted(signal.SIGTERM, "stopped by SIGTERM at step 2 of 6"), 143),
    (Interrupted(signal.SIGINT, "stopped by SIGINT at step 2 of 6"), 130),
    (KeyboardInterrupt(), 130),
])
def test_exit_statuses(error, code, monkeypatch, capsys):
    monkeypatch.setitem(cli.VERBS, "dpo", raising(error))
    assert main(["dpo", "train.max_steps=1"]) == code
    err = capsys.readouterr().err
    assert err.count("prefopt dpo:") == 1 and "Traceback" not in err
    monkeypatch.setitem(cli.VERBS, "dpo", lambda ns: 0)
    assert main(["dpo"]) == 0


def test_an_unexpected_error_exits_1_with_its_traceback():
    code = "import sys, prefopt.cli as c; c.VERBS['keys'] = lambda ns: 1 / 0; sys.exit(c.main(['keys']))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "ZeroDivisionError" in proc.stderr and "Traceback" in proc.stderr


def test_the_exit_statuses_are_documented_in_the_help_and_the_readme(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text().split("## Command line", 1)[1].split("\n## ", 1)[0]
    for code in ("0", "1", "2", "130", "141", "143"):
        assert f"\n  {code} " in out and f"| {code} |" in readme, code
