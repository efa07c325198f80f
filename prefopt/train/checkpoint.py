"""Resumable checkpoints: OUTPUT_DIR/checkpoints/step-N/ and the final model in OUTPUT_DIR/final/.

Never lose work:
- a checkpoint is written into ``checkpoints/.tmp-step-N``, every file fsynced, a manifest of
  sizes and SHA-256 checksums written last, then renamed into place: a kill or a full disk at
  any moment leaves the previous checkpoints as they were (a stale ``.tmp-*`` is ignored and
  cleared by the next save); old checkpoints beyond ``save_total_limit`` go only after that.
- ``resume_from: latest`` takes the newest checkpoint whose files match its manifest and says
  which; a damaged one is named and skipped.
- a run refuses an output directory holding another run's checkpoints or final model unless
  it resumes it or ``overwrite_output_dir`` is set, and a resume names every setting that
  differs from the checkpoint's and would make it another run.

A checkpoint holds what ``accelerate.save_state`` writes (weights as safetensors, optimizer,
scheduler, every RNG state; sharded correctly under FSDP/DeepSpeed), the trainer state
(step, epoch, position in the epoch's batch order) and the resolved config. The reference
model is never in it, nor (one process or DDP) frozen weights such as a LoRA base: the
config rebuilds them. The model's ``config.json`` and the tokenizer are written too, so a
checkpoint folder also loads with ``AutoModelForCausalLM.from_pretrained`` (with LoRA: the
adapter files, loading with ``PeftModel.from_pretrained``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate.utils import DistributedType

from prefopt import console
from prefopt.config import RunConfig, save_config
from prefopt.errors import ConfigError, PrefoptError
from prefopt.lora import bare_name, is_peft_model, merged_copy
from prefopt.vlm import processor_of
from prefopt.train.model_card import write_model_card

log = logging.getLogger("prefopt")

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
LOSS_STATE = "loss_state.json"   # stateful losses (BCO's running mean): JSON, never a pickle


class CheckpointError(PrefoptError):
    """A checkpoint that could not be written (disk full, ...) or read back."""


@dataclass
class TrainState:
    step: int = 0             # optimizer steps done
    epoch: int = 0            # current epoch
    batch_in_epoch: int = 0   # micro-batches of this epoch already consumed
    num_tokens: int = 0       # tokens read by the policy so far (all processes)
    skipped_steps: int = 0    # optimizer steps skipped for a non-finite loss or gradient
    num_processes: int = 1    # the batch geometry a resume must keep
    # streamed data (prefopt.data.stream): each process's own (epoch, batch_in_epoch), since the
    # shares differ in length; None otherwise
    stream_positions: list | None = None


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first; ``.tmp-*`` writes are not."""
    root = output_dir / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(re.sub(r"\D", "", p.name) or 0))


def save_checkpoint(accelerator, model, tokenizer, state: TrainState, config: RunConfig,
                    output_dir: Path, keep: int | None, loss_state: dict | None = None) -> Path:
    """Write checkpoints/step-N atomically (see the module docstring); returns its path.
    A failure on any process (a full disk raises OSError or torch's RuntimeError) is agreed by
    every process, which all stop with the same message: none is left waiting at a barrier.
    A slow save says so on the console (prefopt.console.phase)."""
    with console.phase(f"saving checkpoint {checkpoint_dir(output_dir, state.step)}"):
        return _save_checkpoint(accelerator, model, tokenizer, state, config, output_dir, keep, loss_state)


def _save_checkpoint(accelerator, model, tokenizer, state: TrainState, config: RunConfig,
                     output_dir: Path, keep: int | None, loss_state: dict | None = None) -> Path:
    path = checkpoint_dir(output_dir, state.step)
    tmp = path.parent / f".tmp-{path.name}"
    main = accelerator.is_main_process
    if main:
        for stale in path.parent.glob(".tmp-*") if path.parent.is_dir() else ():  # killed writes
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(tmp))  # trainable parameters only (prefopt.lora.without_frozen_weights)
    except (OSError, RuntimeError) as e:
        error = e
    # every process's files (RNG states, shards) are complete before the manifest lists them
    error = _agree(accelerator, error)
    if error is None and main:
        try:
            raw = accelerator.unwrap_model(model)
            if not is_peft_model(raw):
                raw.config.save_pretrained(tmp)
            elif accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
                raw.save_pretrained(tmp)  # the adapter, loadable with PeftModel.from_pretrained(base, path)
            if tokenizer is not None:
                (processor_of(tokenizer) or tokenizer).save_pretrained(tmp)
            save_config(config, tmp / "config.yaml")
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
            if loss_state:
                (tmp / LOSS_STATE).write_text(json.dumps(encode_state(loss_state)))
            fault_point("checkpoint", state.step)
            write_manifest(tmp)
        except (OSError, RuntimeError) as e:
            error = e
    error = _agree(accelerator, error)
    if error is not None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(output_dir)
        if error is True:
            reason = "another process failed to write its part"
        else:
            reason = getattr(error, "strerror", None) or (str(error).splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"could not write the checkpoint of step {state.step} to {path}: {reason}. "
            + (f"The previous checkpoint {previous[-1]} is intact: free space and resume with "
               f"train.resume_from=latest" if previous else "No earlier checkpoint exists"))
    if main:
        aside = path.parent / f".old-{path.name}"
        if path.exists():  # the same step written before: set aside, so a kill never leaves half of it
            os.replace(path, aside)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(aside, ignore_errors=True)
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def _agree(accelerator, error):
    """The error of this process, or True when another process failed (one all-reduce)."""
    if accelerator.num_processes == 1:
        return error
    import torch

    failed = accelerator.reduce(torch.tensor([0 if error is None else 1], device=accelerator.device), reduction="max")
    return error if error is not None else (True if int(failed.item()) else None)


def write_manifest(folder: Path) -> None:
    """Every file's size and SHA-256, each file fsynced first; the manifest itself last."""
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        with f.open("rb") as handle:
            os.fsync(handle.fileno())
        files[f.relative_to(folder).as_posix()] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    target = folder / MANIFEST
    with target.open("w") as handle:
        json.dump({"files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(folder)


def checkpoint_problem(folder: Path, checksums: bool = True) -> str | None:
    """What is wrong with a checkpoint folder (None: its files match its manifest)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return None if (folder / STATE_FILE).is_file() else f"no {STATE_FILE}"  # written before manifests
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for name, want in manifest.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {want['bytes']}"
        if checksums and _sha256(f) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fault_point(name: str, step: int) -> None:
    """Crash tests: ``PREFOPT_FAULT=kill:checkpoint:3`` SIGKILLs this process at that point (here:
    in the middle of writing step 3's checkpoint, weights written, manifest not yet)."""
    if os.environ.get("PREFOPT_FAULT") == f"kill:{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def resolve_resume(resume_from: str, output_dir: Path) -> Path:
    """The checkpoint to resume: ``latest`` is the newest whose files match its manifest (a
    damaged one is named and skipped); a named folder must itself be sound."""
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(f"train.resume_from=latest: no checkpoint in {output_dir / 'checkpoints'}")
        for path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            log.warning("checkpoint %s is damaged (%s); falling back to the one before it", path, problem)
        raise CheckpointError(f"train.resume_from=latest: every checkpoint in {output_dir / 'checkpoints'} is damaged")
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"train.resume_from: {path} is not a prefopt checkpoint (no {STATE_FILE})")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"train.resume_from: {path} is damaged: {problem}")
    return path


# Settings a resumed run must share with its checkpoint: another value makes it another run
# (other weights, other data order or batch geometry). Everything else (max_steps, logging,
# eval, save cadence...) may change on resume and is listed in the log.
SAME_RUN_KEYS = ("model.name_or_path", "model.tokenizer", "model.lora", "model.dtype", "model.load_in_4bit",
                 "model.chat_template", "loss", "reference.strategy", "reference.name_or_path", "data.train",
                 "data.split", "data.columns", "data.format", "data.eval_split_size", "data.max_length",
                 "data.max_prompt_length", "data.prompt_truncation", "data.truncation", "data.layout",
                 "data.max_examples", "data.max_tokens_per_batch", "data.max_tokens_per_row", "data.group_by_length",
                 "data.streaming", "data.shuffle_buffer",
                 "train.per_device_train_batch_size", "train.gradient_accumulation_steps", "train.seed",
                 "num_processes")


def resume_differences(path: Path, config: RunConfig, num_processes: int) -> tuple[list[str], list[str]]:
    """(differences that make the checkpoint another run's, other differences) as
    'key: checkpoint X, now Y' lines."""
    from prefopt.config import load_config, to_dict

    try:
        then = _flat(to_dict(load_config(path / "config.yaml")))
    except (OSError, PrefoptError) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint's config.yaml ({e})") from None
    state = json.loads((path / STATE_FILE).read_text())
    then["num_processes"] = state.get("num_processes", 1)
    now = {**_flat(to_dict(config)), "num_processes": num_processes}
    ignore = ("output_dir", "train.resume_from", "train.overwrite_output_dir", "train.progress_bar")
    lines = {k: f"{k}: checkpoint {then.get(k)!r}, now {now.get(k)!r}"
             for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k) and k not in ignore}
    return ([line for k, line in lines.items() if k in SAME_RUN_KEYS],
            [line for k, line in lines.items() if k not in SAME_RUN_KEYS])


def set_aside_later_checkpoints(output_dir: Path, step: int, accelerator) -> None:
    """Resuming from step S while checkpoints after S exist (an explicit earlier checkpoint, or
    ``latest`` past a damaged one): those belong to the abandoned continuation. They are moved
    to checkpoints/superseded/ (not deleted), so neither ``latest`` nor save_total_limit's
    pruning confuses them with this run's."""
    later = [p for p in list_checkpoints(output_dir) if int(p.name.split("-")[1]) > step]
    if later and accelerator.is_main_process:
        aside = output_dir / "checkpoints" / "superseded"
        aside.mkdir(exist_ok=True)
        for p in later:
            target = aside / p.name
            if target.exists():
                shutil.rmtree(target)
            os.replace(p, target)
        log.info("checkpoints after step %d (%s) moved to %s: this run continues from step %d", step,
                 ", ".join(p.name for p in later), aside, step)
    accelerator.wait_for_everyone()


def _flat(config: dict) -> dict:
    """{section.key: value} one level deep (a LoRA mapping or the loss list stays one value)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def claim_output_dir(output_dir: Path, overwrite: bool, resuming: bool, accelerator) -> None:
    """Refuse a directory that holds another run's checkpoints or final model (unless the run
    resumes it); with ``overwrite`` delete them (main process) and go on."""
    checkpoints, final = list_checkpoints(output_dir), output_dir / "final"
    # every process decides before any deletes (a slower one would otherwise find nothing and
    # skip the barrier below)
    accelerator.wait_for_everyone()
    if resuming or not (checkpoints or final.is_dir()):
        return
    held = ([f"checkpoints {checkpoints[0].name}..{checkpoints[-1].name}"] if checkpoints else []) + \
           (["final/"] if final.is_dir() else [])
    if not overwrite:
        raise ConfigError(f"{output_dir} holds another run ({', '.join(held)}). Resume it with "
                          f"train.resume_from=latest, choose another output_dir, or set "
                          f"train.overwrite_output_dir=true to delete them and start afresh")
    if accelerator.is_main_process:
        log.info("overwrite_output_dir: deleting the previous run's %s in %s", ", ".join(held), output_dir)
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    accelerator.wait_for_everyone()


def encode_state(value):
    """Loss state as JSON: tensors as {tensor, dtype} (float64 values round-trip exactly)."""
    import torch

    if isinstance(value, dict):
        return {str(k): encode_state(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return {"tensor": value.detach().cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    return value


def decode_state(value, device=None):
    import torch

    if isinstance(value, dict) and set(value) == {"tensor", "dtype"}:
        return torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]), device=device)
    if isinstance(value, dict):
        return {k: decode_state(v, device) for k, v in value.items()}
    return value


def load_loss_state(path: Path, device=None) -> dict | None:
    f = path / LOSS_STATE
    return decode_state(json.loads(f.read_text()), device) if f.is_file() else None


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
        _load_state(accelerator, path, strict=False)
    else:
        _load_state(accelerator, path)
    return TrainState(**json.loads((path / STATE_FILE).read_text()))


def _load_state(accelerator, path: Path, **kwargs) -> None:
    """accelerate.load_state; its pickled parts (optimizer, scheduler, RNG) load with
    torch.load(weights_only=True), so a tampered file is refused, never run."""
    import pickle

    try:
        accelerator.load_state(str(path), **kwargs)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load a file of the checkpoint: it holds objects other than "
                              f"tensors and plain values, which could run code ({str(e).splitlines()[0][:200]})") from None


def full_state_dict(accelerator, model) -> dict:
    """The whole model's state dict, for the main process (called on every process: gathering
    is collective). FSDP2's and ZeRO-3's gathering give it to rank 0 only (``{}`` / None elsewhere)."""
    return accelerator.get_state_dict(model) or {}


def save_final(accelerator, model, tokenizer, config: RunConfig, output_dir: Path,
               path: Path | str | None = None) -> Path:
    """OUTPUT_DIR/final/ (or ``path``): model + tokenizer loadable by
    AutoModelForCausalLM.from_pretrained, the resolved config and the model card (README.md);
    the state dict is gathered from every process's shards (FSDP, ZeRO-3) and written once, by
    the main process."""
    path = Path(path) if path is not None else output_dir / "final"
    with console.phase(f"saving the model to {path}"):
        return _save_final(accelerator, model, tokenizer, config, output_dir, path)


def _save_final(accelerator, model, tokenizer, config: RunConfig, output_dir: Path, path: Path) -> Path:
    state_dict = full_state_dict(accelerator, model)
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(model)
        if is_peft_model(raw) and config.save.merge_lora:
            merged_copy(raw).save_pretrained(path, safe_serialization=True)
        else:  # a PeftModel writes its adapter (and its config naming the base)
            raw.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            (processor_of(tokenizer) or tokenizer).save_pretrained(path)
        save_config(config, path / "prefopt_config.yaml")
        adapter = is_peft_model(raw) and not config.save.merge_lora
        write_model_card(config, output_dir, path, adapter=adapter, num_processes=accelerator.num_processes)
    accelerator.wait_for_everyone()
    return path
