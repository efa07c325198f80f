"""Security: weights only through safetensors; pickled checkpoint parts load with
weights_only=True, so a tampered file is refused and never runs; a stateful loss is saved as
JSON; YAML is read with a safe loader; remote modelling code only when asked (and logged)."""
import pickle

import pytest

from prefopt import ConfigError, DPOConfig, DPOTrainer
from prefopt.config import load_config
from prefopt.train.checkpoint import CheckpointError, write_manifest

SHORT = dict(max_length=64, max_prompt_length=32, logging_steps=1, progress_bar=False,
             per_device_train_batch_size=2, learning_rate=1e-3)


class Payload:
    """Unpickling this creates the marker file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_tampered_checkpoint_is_refused_and_never_runs(tiny_model_dir, demo_records, tmp_path):
    out = tmp_path / "run"
    DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:8], loss="bco_pair",
               args=DPOConfig(output_dir=str(out), max_steps=2, save_steps=1, **SHORT)).train()
    step = out / "checkpoints" / "step-2"
    names = sorted(p.name for p in step.iterdir())
    assert "model.safetensors" in names and "loss_state.json" in names
    assert not [n for n in names if n.startswith("custom_checkpoint")]  # BCO's mean is JSON, not a pickle
    marker = tmp_path / "pwned"
    with (step / "optimizer.bin").open("wb") as f:
        pickle.dump({"state": Payload(marker)}, f)
    write_manifest(step)  # a consistent manifest: only the content is hostile
    with pytest.raises(CheckpointError, match="refused to load a file of the checkpoint: it holds objects other "
                                              "than tensors"):
        DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:8], loss="bco_pair",
                   args=DPOConfig(output_dir=str(out), max_steps=3, resume_from=str(step), **SHORT)).train()
    assert not marker.exists()


def test_yaml_is_read_with_a_safe_loader(tmp_path):
    marker = tmp_path / "pwned"
    config = tmp_path / "bad.yaml"
    config.write_text(f"output_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError):
        load_config(config)
    assert not marker.exists()


def test_remote_code_only_when_asked_and_logged(tiny_model_dir, monkeypatch, caplog):
    import transformers

    from prefopt.config import ModelConfig
    from prefopt.models import load_model

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: seen.append(k["trust_remote_code"]) or real(*a, **k))
    caplog.set_level("WARNING", logger="prefopt")
    load_model(str(tiny_model_dir))
    assert seen == [False] and "trust_remote_code" not in caplog.text
    load_model(str(tiny_model_dir), model_cfg=ModelConfig(trust_remote_code=True))
    assert seen == [False, True] and "running the modelling code that comes with" in caplog.text


def test_a_python_judge_only_imports_the_module_named(tmp_path):
    from prefopt.judges import make_judge

    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError, match="cannot import judge function"):
        make_judge({"name": "python", "function": f"os.system('touch {marker}'):f"})
    assert not marker.exists()  # a module path, never evaluated as code
    assert make_judge({"name": "python", "function": "math:hypot"}).score([3], [4]) == [5.0]  # fn(prompt, completion)
