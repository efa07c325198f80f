"""Resumable checkpoints: OUTPUT_DIR/checkpoints/step-N/ and the final model in OUTPUT_DIR/final/.

A checkpoint holds what ``accelerate.save_state`` writes (weights as safetensors, optimizer,
scheduler, every RNG state; sharded correctly under FSDP/DeepSpeed), the trainer state
(step, epoch, position in the epoch's batch order) and the resolved config. The reference
model is never in it, nor (one process or DDP) frozen weights such as a LoRA base: the
config rebuilds them. The model's ``config.json`` and the tokenizer are written too, so a
checkpoint folder also loads with ``AutoModelForCausalLM.from_pretrained`` (with LoRA: the
adapter files, loading with ``PeftModel.from_pretrained``).
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate.utils import DistributedType

from prefopt.config import RunConfig, save_config
from prefopt.errors import ConfigError
from prefopt.lora import bare_name, is_peft_model, merged_copy

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
        if not is_peft_model(raw):
            raw.config.save_pretrained(path)
        elif accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raw.save_pretrained(path)  # the adapter, loadable with PeftModel.from_pretrained(base, path)
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
    """Restore a checkpoint. Without frozen parameters every weight must load (strict); with
    them (a LoRA base, left out of the checkpoint) every trainable parameter must be in the file,
    and anything else missing is the frozen part the config already rebuilt."""
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    weights = path / "model.safetensors"
    if frozen and weights.is_file():  # single process / DDP (FSDP and DeepSpeed load their own format)
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            stored = {bare_name(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        params = {bare_name(n): p for n, p in model.named_parameters()}
        missing = [n for n, p in params.items() if p.requires_grad and n not in stored]
        reshaped = [f"{n} {list(shape)} (model: {list(params[n].shape)})" for n, shape in stored.items()
                    if n in params and tuple(params[n].shape) != shape]
        if missing or reshaped:
            problem = (f"lacks {len(missing)} trainable parameter(s) of this model (e.g. {missing[0]})" if missing
                       else f"holds {len(reshaped)} parameter(s) of another shape (e.g. {reshaped[0]})")
            raise ConfigError(f"{path}: the checkpoint {problem}; it was written by another model or LoRA "
                              f"configuration")
        accelerator.load_state(str(path), strict=False)
    else:
        accelerator.load_state(str(path))
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
