"""The shipped accelerate configs (configs/accelerate/) load with accelerate's own config
reader, launch what their comments say, and say where they were last run."""
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
EXPECTED = {"ddp.yaml": ("MULTI_GPU", 1), "fsdp2.yaml": ("FSDP", 1), "zero2.yaml": ("DEEPSPEED", 1),
            "zero3.yaml": ("DEEPSPEED", 1), "multinode.yaml": ("MULTI_GPU", 2)}


def test_every_config_is_expected():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerate(name):
    config = load_config_from_file(str(CONFIGS / name))
    kind, machines = EXPECTED[name]
    assert config.distributed_type.value == kind and config.num_machines == machines
    text = (CONFIGS / name).read_text()
    assert "accelerate launch --config_file configs/accelerate/" in text and "-m prefopt" in text
    assert "# Last run:" in text
    if name == "fsdp2.yaml":
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_reshard_after_forward"] is True
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[4])
