"""Resumable checkpoints: OUTPUT_DIR/checkpoints/step-N/ and the final model in OUTPUT_DIR/final/.

A checkpoint holds what ``accelerate.save_state`` writes (the trainable weights as
safetensors, optimizer, scheduler, every RNG state; sharded correctly under FSDP/DeepSpeed),
the trainer state (step, epoch, position in the epoch's batch order) and the resolved
config. Frozen weights (a LoRA base; the reference model) are never in it: the config
rebuilds them. The model's ``config.json`` and the tokenizer are written too, so a
checkpoint folder also loads with ``AutoModelForCausalLM.from_pretrained`` (with LoRA: the
adapter files, loading with ``PeftModel.from_pretrained``).
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from prefopt.config import RunConfig, save_config
from prefopt.errors import ConfigError
from prefopt.lora import is_peft_model, merged_copy

STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    step: int = 0             # optimizer steps done
    epoch: int = 0            # current epoch
    batch_in_epoch: int = 0   # micro-batches of this epoch already consumed
    num_tokens: int = 0       # tokens read by the policy so far (all processes)


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(re.sub(r"\D", "", p.name) or 0))


def save_checkpoint(accelerator, model, tokenizer, state: TrainState, config: RunConfig,
                    output_dir: Path, keep: int | None) -> Path:
    path = checkpoint_dir(output_dir, state.step)
    accelerator.save_state(str(path))  # trainable parameters only (prefopt.lora.trainable_only)
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(model)
        if is_peft_model(raw):  # the adapter, loadable with PeftModel.from_pretrained(base, path)
            raw.save_pretrained(path)
        else:
            raw.config.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        save_config(config, path / "config.yaml")
        (path / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def resolve_resume(resume_from: str, output_dir: Path) -> Path:
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(f"train.resume_from=latest: no checkpoint in {output_dir / 'checkpoints'}")
        return found[-1]
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"train.resume_from: {path} is not a prefopt checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(accelerator, model, path: Path) -> TrainState:
    # A checkpoint holds the trainable parameters; frozen ones (a LoRA base) come from the config.
    frozen = any(not p.requires_grad for p in model.parameters())
    accelerator.load_state(str(path), strict=not frozen)
    return TrainState(**json.loads((path / STATE_FILE).read_text()))


def save_final(accelerator, model, tokenizer, config: RunConfig, output_dir: Path,
               path: Path | str | None = None) -> Path:
    """OUTPUT_DIR/final/ (or ``path``): model + tokenizer loadable by
    AutoModelForCausalLM.from_pretrained; the state dict is gathered from every process's
    shards (FSDP, ZeRO-3) and written once, by the main process."""
    path = Path(path) if path is not None else output_dir / "final"
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(model)
        if is_peft_model(raw) and config.save.merge_lora:
            merged_copy(raw).save_pretrained(path, safe_serialization=True)
        else:  # a PeftModel writes its adapter (and its config naming the base)
            raw.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        save_config(config, path / "prefopt_config.yaml")
    accelerator.wait_for_everyone()
    return path
