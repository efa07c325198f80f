"""Every shipped training config trains the tiny model for a few steps on CPU.

The configs are used as shipped; only the model (the tiny test model), the output
directory and the size of the run are overridden, and data paths are resolved against
the repository root. Each run must log finite losses and the metrics its loss family
promises (rewards for reference-based losses, kl for KTO, loss/nll for NLL terms, one
loss/<name> per mixed loss).
"""
import json
import math
from pathlib import Path

import pytest

from prefopt.config import load_config
from prefopt.losses import get_spec
from prefopt.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in ROOT.glob("configs/**/*.yaml")
                 if p.name != "eval.yaml"
                 and not {"methods", "accelerate", "multimodal"} & set(p.relative_to(ROOT).parts))
# methods: tests/test_methods.py; accelerate (launch configs): tests/test_launch_configs.py;
# multimodal (a vision-language model): tests/test_multimodal.py
HH_FIXTURE = ROOT / "tests" / "fixtures" / "hh_harmless_40.jsonl"
SMALL = ["train.max_steps=2", "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=1",
         "train.eval_steps=0", "train.save_steps=0", "train.logging_steps=1", "train.progress_bar=false",
         "data.max_examples=16", "data.eval_split_size=4", "data.max_length=64", "data.max_prompt_length=32"]


def resolve_data(path: str) -> Path:
    resolved = ROOT / path
    if not resolved.exists() and "hh_harmless" in path:
        return HH_FIXTURE  # ../shared may be absent; the fixture is a slice of the same file
    return resolved


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_trains_tiny_model(path, tiny_model_dir, tmp_path):
    shipped = load_config(path)
    cache = [f"reference.cache_dir={tmp_path / 'cache'}"] if shipped.reference.cache_dir else []
    config = load_config(path, [f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path}",
                                f"data.train={resolve_data(shipped.data.train)}", *SMALL, *cache])
    Trainer.from_config(config).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in train_rows)
    first = train_rows[0]
    specs = [(get_spec(t.name), t.resolved_params()) for t in config.loss]
    if any(spec.needs_reference(params) for spec, params in specs):
        assert {"rewards/chosen", "rewards/rejected"} <= first.keys()
    if any(spec.name == "kto" for spec, _ in specs):
        assert "kl" in first and {"logps/chosen", "logps/rejected"} <= first.keys()
    if any(spec.name in ("rpo", "cpo", "orpo") for spec, _ in specs):
        assert "loss/nll" in first
    if len(config.loss) > 1:
        assert {f"loss/{t.name}" for t in config.loss} <= first.keys()
        assert first["loss"] == pytest.approx(sum(t.weight * first[f"loss/{t.name}"] for t in config.loss), rel=1e-5)
    saved = "adapter_model.safetensors" if config.model.lora and not config.save.merge_lora else "model.safetensors"
    assert (tmp_path / "final" / saved).is_file()
