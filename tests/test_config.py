"""Config parsing: overrides, suggestions for unknown keys, the flat Python API, shipped configs."""
from pathlib import Path

import pytest
import yaml

from prefopt import DPOConfig, SFTConfig
from prefopt.config import (RunConfig, apply_override, config_from_dict, describe_keys, load_config,
                            save_config, to_dict)
from prefopt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# configs/accelerate/ holds accelerate's launch configs (tests/test_launch_configs.py), not prefopt's
SHIPPED = sorted(p for p in ROOT.glob("configs/**/*.yaml") if "accelerate" not in p.parts) + \
    sorted((ROOT / "prefopt" / "demo").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and cfg.loss
    save_config(cfg, tmp_path / "c.yaml")
    assert to_dict(load_config(tmp_path / "c.yaml")) == to_dict(cfg)


def test_shipped_configs_exist():
    assert len(SHIPPED) >= 8


def test_dotted_overrides_and_yaml_values():
    cfg = load_config(None, ["train.learning_rate=1e-5", "data.max_length=128", "loss.beta=0.3",
                             "data.columns={prompt: q}", "reference.name_or_path=null"])
    assert cfg.train.learning_rate == 1e-5  # PyYAML reads 1e-5 as a string; it is coerced
    assert cfg.data.max_length == 128 and cfg.loss[0].params["beta"] == 0.3
    assert cfg.data.columns == {"prompt": "q"} and cfg.reference.name_or_path is None


def test_loss_forms_name_mapping_list():
    assert load_config(None, ["loss=ipo"]).loss[0].name == "ipo"
    cfg = config_from_dict({"loss": [{"name": "dpo", "weight": 0.8, "beta": 0.2}, {"name": "sft", "weight": 0.2}]})
    assert [(t.name, t.weight) for t in cfg.loss] == [("dpo", 0.8), ("sft", 0.2)]
    assert cfg.loss[0].params == {"beta": 0.2, "label_smoothing": 0.0, "reference_free": False,
                                  "f_divergence": "reverse_kl", "f_alpha": 0.5}
    data = {"loss": [{"name": "dpo"}, {"name": "sft"}]}
    apply_override(data, "loss.1.weight=0.5")
    assert data["loss"][1]["weight"] == 0.5
    with pytest.raises(ConfigError, match="address one as loss.<index>"):
        apply_override(data, "loss.beta=0.1")


@pytest.mark.parametrize("override, message", [
    ("train.learnig_rate=1", "unknown config key 'train.learnig_rate' (did you mean 'train.learning_rate'?)"),
    ("trian.seed=1", "override 'trian.seed=1': unknown config key 'trian.seed' (did you mean 'train.seed'?)"),
    ("loss=dpoo", "unknown loss 'dpoo' (did you mean 'dpo'?)"),
    ("loss.bta=1", "unknown parameter of 'dpo' 'bta' (did you mean 'beta'?)"),
    ("train.max_steps=ten", "train.max_steps: expected int, got 'ten'"),
    ("train.mixed_precision=bf61", "'bf61' is not one of ['auto', 'no', 'bf16', 'fp16'] (did you mean 'bf16'?)"),
    ("data.on_error=ignore", "is not one of ['raise', 'skip']"),
    ("loss.label_smoothing=0.7", "label_smoothing=0.7 must be < 0.5"),
])
def test_bad_config_messages(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rat: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: unknown config key 'train.learning_rat'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_flat_python_config_routes_keys():
    cfg = DPOConfig(output_dir="out", learning_rate=5e-7, max_length=64, per_device_train_batch_size=2,
                    beta=0.2, ref_model="some/ref", bf16=True)
    assert cfg.output_dir == "out" and cfg.train.learning_rate == 5e-7 and cfg.data.max_length == 64
    assert cfg.loss[0].params["beta"] == 0.2 and cfg.reference.name_or_path == "some/ref"
    assert cfg.train.mixed_precision == "bf16" and isinstance(cfg, RunConfig)
    assert SFTConfig().loss[0].name == "sft" and SFTConfig().train.learning_rate == 2e-5
    assert SFTConfig(learning_rate=1e-4).train.learning_rate == 1e-4
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        DPOConfig(learning_rat=1e-5)


def test_every_key_has_help():
    rows = describe_keys()
    assert len(rows) > 40
    assert all(text.strip() for _, _, _, text in rows)


def test_resolved_config_is_plain_yaml(tmp_path):
    save_config(load_config(None, ["loss=ipo"]), tmp_path / "c.yaml")
    data = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert data["loss"] == [{"name": "ipo", "weight": 1.0, "beta": 0.1}]


def test_base_configs_merge_sections_and_replace_the_loss(tmp_path):
    (tmp_path / "parent.yaml").write_text("output_dir: a\ntrain: {learning_rate: 1.0e-3, seed: 7}\n"
                                          "loss: [{name: dpo}, {name: sft, weight: 0.1}]\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("base: ../parent.yaml\ntrain: {seed: 9}\nloss: {name: ipo}\n")
    cfg = load_config(tmp_path / "sub" / "child.yaml")
    assert cfg.output_dir == "a" and cfg.train.learning_rate == 1e-3 and cfg.train.seed == 9
    assert [t.name for t in cfg.loss] == ["ipo"]
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")


def test_string_none_is_a_value_for_string_fields_and_null_for_others():
    cfg = load_config(None, ["reference.strategy=none", "data.max_prompt_length=None"])
    assert cfg.reference.strategy == "none" and cfg.data.max_prompt_length is None
    assert DPOConfig(reference={"strategy": "none"}).reference.strategy == "none"


def test_verb_defaults_merge_with_a_files_sections(tmp_path):
    (tmp_path / "c.yaml").write_text("train: {seed: 3}\n")
    cfg = load_config(tmp_path / "c.yaml", defaults={"loss": "sft", "train": {"learning_rate": 2e-5}})
    assert cfg.train.learning_rate == 2e-5 and cfg.train.seed == 3 and cfg.loss[0].name == "sft"
