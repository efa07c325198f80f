"""The Python API: ``DPOTrainer``/``SFTTrainer`` (and ``Trainer`` for any objective).

    from prefopt import DPOTrainer, DPOConfig
    trainer = DPOTrainer(model, ref_model, beta=0.1, train_dataset=ds, eval_dataset=ds_eval,
                         tokenizer=tokenizer, args=DPOConfig(output_dir="out", max_steps=100))
    trainer.train()
    trainer.save_model()

``model`` and ``ref_model`` are model objects or hub ids / directories; ``ref_model=None``
is a frozen copy of the initial policy (or no reference when the loss needs none);
datasets are a ``datasets.Dataset``, a list of dicts, or a path. ``extra_losses`` maps names
to callables ``fn(step: StepOutput) -> scalar tensor`` (e.g. a safety penalty) added to the
loss, averaged over the micro-batches of a step and logged as ``loss/<name>``. The trainer builds the
pieces (tokenizer, model, reference strategy, objective, data, optimizer, schedule),
hands them to accelerate, and runs prefopt.train.loop; the CLI goes through the same code.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

from prefopt.config import RunConfig, config_from_flat, parse_loss, save_config, to_dict
from prefopt.data.collate import PaddedCollator
from prefopt.data.pipeline import Dataset, prepare_datasets
from prefopt.errors import ConfigError
from prefopt.objective import Objective
from prefopt.reference import build_reference
from prefopt.train import loop

log = logging.getLogger("prefopt")


class TailMergingBatchSampler(BatchSampler):
    """Batches of ``batch_size``; a last batch smaller than ``min_size`` joins the one before it.

    Losses that compare examples within a micro-batch (KTO's mismatched pairs) need at least
    two; merging the tail keeps every example instead of dropping it.
    """

    def __init__(self, sampler: Sampler, batch_size: int, min_size: int = 1):
        super().__init__(sampler, batch_size, drop_last=False)
        self.min_size = min_size

    def __iter__(self):
        batches = list(super().__iter__())
        if len(batches) > 1 and len(batches[-1]) < self.min_size:
            tail = batches.pop()
            batches[-1] = batches[-1] + tail
        return iter(batches)

    def __len__(self) -> int:
        n = super().__len__()
        tail = len(self.sampler) % self.batch_size
        return n - 1 if n > 1 and 0 < tail < self.min_size else n


class EpochSampler(Sampler):
    """A seeded permutation per epoch: the order of epoch e is a function of (seed, e) only,
    so a resumed run sees exactly the batches the uninterrupted run would have seen."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.size))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=gen).tolist())

    def __len__(self) -> int:
        return self.size


class Trainer:
    """Train any objective from the registry. Subclasses only change defaults."""
    default_loss: str = "dpo"

    def __init__(self, model: Any = None, ref_model: Any = None, *, args: RunConfig | None = None,
                 train_dataset: Any = None, eval_dataset: Any = None, tokenizer: Any = None,
                 processing_class: Any = None, loss: Any = None,
                 extra_losses: dict[str, Callable] | None = None, **loss_params):
        config = args if args is not None else config_from_flat({"loss": self.default_loss}, {})
        if loss is not None or loss_params:
            terms = to_dict(config.loss)
            if loss is not None:
                terms = loss
            elif len(terms) == 1:
                terms = {**terms[0], **loss_params}
            else:
                raise ConfigError("loss parameters given as keywords, but the objective has several "
                                  "losses; pass loss=[{name: ..., ...}, ...]")
            config.loss = parse_loss(terms)
        self.config = config
        self._model_arg = model
        self._ref_model_arg = ref_model
        self._train_source = train_dataset
        self._eval_source = eval_dataset
        self._tokenizer_arg = tokenizer if tokenizer is not None else processing_class
        self._extra_losses = extra_losses
        self.job: loop.Job | None = None
        self.state = None

    @classmethod
    def from_config(cls, config: RunConfig) -> "Trainer":
        return cls(args=config)

    # ------------------------------------------------------------------ public API
    def train(self) -> dict:
        """Train; returns the last logged eval metrics (empty without eval data)."""
        job = self.setup(need_train=True)
        self.state, last_eval = loop.train(job)
        return last_eval

    def evaluate(self, on: str = "eval") -> dict:
        """Objective metrics of the current model (keys prefixed ``eval/``).

        ``on="eval"`` uses the eval data; ``on="train"`` the training examples, in order,
        with the eval batch size (e.g. to report reward accuracy on the training pairs).
        """
        job = self.setup(need_train=False)
        if on == "train":
            if self._train_set is None:
                raise ConfigError("evaluate(on='train') needs training data")
            loader = job.accelerator.prepare_data_loader(self._loader(
                self._train_set, self._collator, self.config.train.per_device_eval_batch_size, False))
        elif on == "eval":
            loader = job.eval_loader
            if loader is None:
                raise ConfigError("evaluate() needs eval data: eval_dataset, data.eval or data.eval_split_size")
        else:
            raise ConfigError(f"evaluate(on={on!r}): expected 'train' or 'eval'")
        values = loop.evaluate(job.accelerator, job.model, job.objective, loader)
        return {f"eval/{k}": v for k, v in values.items()}

    def save_model(self, path: str | Path | None = None) -> Path:
        """Save model + tokenizer in HF format (default OUTPUT_DIR/final)."""
        from prefopt.train.checkpoint import save_final
        job = self.setup(need_train=False)
        if path is None:
            return save_final(job.accelerator, job.model, job.tokenizer, job.config, job.output_dir)
        path = Path(path)
        job.accelerator.unwrap_model(job.model).save_pretrained(path, safe_serialization=True)
        job.tokenizer.save_pretrained(path)
        return path

    @property
    def model(self):
        return self.job.accelerator.unwrap_model(self.job.model) if self.job else self._model_arg

    # ------------------------------------------------------------------ assembly
    def setup(self, need_train: bool = True) -> loop.Job:
        if self.job is not None:
            return self.job
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg = self.config
        tcfg = cfg.train
        if tcfg.gradient_accumulation_steps < 1 or tcfg.per_device_train_batch_size < 1:
            raise ConfigError("train.per_device_train_batch_size and gradient_accumulation_steps must be >= 1")
        # Under torchrun on a machine without CUDA, accelerate only forms the gloo process group
        # when asked for CPU explicitly; otherwise each process would silently train alone.
        distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        accelerator = Accelerator(mixed_precision=tcfg.mixed_precision, cpu=distributed_cpu)
        set_seed(tcfg.seed)
        output_dir = Path(cfg.output_dir)

        tokenizer = self._build_tokenizer()
        model = self._build_model()
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        needed, needed_by = Objective.requirements(cfg.loss)
        reference = build_reference(cfg.reference, cfg.model, needed=needed, needed_by=needed_by,
                                    policy=model, ref_model=self._ref_model_arg)
        objective = Objective.from_config(cfg.loss, reference, self._extra_losses)

        train_set, eval_set = prepare_datasets(
            cfg.data, tokenizer, objective.kind, train_source=self._train_source,
            eval_source=self._eval_source, seed=tcfg.seed, required_columns=objective.columns,
            optional_columns=objective.optional_columns, record_checks=objective.record_checks)
        if need_train and train_set is None:
            raise ConfigError("no training data: pass train_dataset or set data.train")
        self._report_data(accelerator, output_dir, train_set, eval_set)

        collator = PaddedCollator(tokenizer.pad_token_id, objective.roles, cfg.data.pad_to_multiple_of,
                                  objective.extra_columns)
        self._train_set, self._collator = train_set, collator
        self._min_batch_size = objective.min_batch_size
        first = train_set or eval_set
        objective.preflight(collator(first.examples[:tcfg.per_device_train_batch_size]))
        train_loader = self._loader(train_set, collator, tcfg.per_device_train_batch_size, True)
        eval_loader = self._loader(eval_set, collator, tcfg.per_device_eval_batch_size, False)
        steps_per_epoch = max(1, math.ceil(len(train_loader) / tcfg.gradient_accumulation_steps)) \
            if train_loader is not None else 1
        total_steps = tcfg.max_steps if tcfg.max_steps > 0 else max(1, math.ceil(tcfg.num_train_epochs * steps_per_epoch))

        optimizer = self._optimizer(model)
        scheduler = self._scheduler(optimizer, total_steps)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        if train_loader is not None:
            train_loader = accelerator.prepare_data_loader(train_loader)
        if eval_loader is not None:
            eval_loader = accelerator.prepare_data_loader(eval_loader)
        reference.prepare(accelerator)
        if objective.stateful:  # e.g. BCO's running reward mean: saved and restored with checkpoints
            accelerator.register_for_checkpointing(objective)
        if accelerator.is_main_process and need_train:
            save_config(cfg, output_dir / "config.yaml")
            log.info("objective: %s | reference: %s | %d optimizer steps (%d per epoch)",
                     " + ".join(f"{t.weight:g}*{t.spec.name}" for t in objective.terms),
                     getattr(reference, "description", reference.name), total_steps, steps_per_epoch)
        self.job = loop.Job(cfg, accelerator, model, tokenizer, objective, optimizer, scheduler,
                            train_loader, eval_loader, output_dir, total_steps, steps_per_epoch)
        return self.job

    def _build_tokenizer(self):
        from prefopt.models import load_tokenizer, prepare_tokenizer

        tok = self._tokenizer_arg
        if tok is None or isinstance(tok, (str, Path)):
            source = tok or self.config.model.tokenizer or self._model_path()
            if source is None:
                raise ConfigError("no tokenizer: pass tokenizer= or set model.tokenizer / model.name_or_path")
            return load_tokenizer(str(source), self.config.model.chat_template)
        return prepare_tokenizer(tok, self.config.model.chat_template)

    def _model_path(self) -> str | None:
        if isinstance(self._model_arg, (str, Path)):
            return str(self._model_arg)
        return self.config.model.name_or_path if self._model_arg is None else None

    def _build_model(self):
        from prefopt.models import load_model

        if isinstance(self._model_arg, torch.nn.Module):
            if self.config.model.name_or_path is None:
                self.config.model.name_or_path = getattr(self._model_arg.config, "_name_or_path", None) or None
            return self._model_arg
        path = self._model_path()
        if path is None:
            raise ConfigError("no model: pass model= or set model.name_or_path")
        self.config.model.name_or_path = path
        return load_model(path, self.config.model.dtype, self.config.model)

    def _loader(self, data: Dataset | None, collator, batch_size: int, shuffle: bool):
        if data is None:
            return None
        sampler = EpochSampler(len(data), self.config.train.seed, shuffle)
        batches = TailMergingBatchSampler(sampler, batch_size, self._min_batch_size)
        return DataLoader(data.examples, batch_sampler=batches, collate_fn=collator)

    def _optimizer(self, model) -> torch.optim.Optimizer:
        t = self.config.train
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]      # no decay on biases and norm weights
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)

    def _scheduler(self, optimizer, total_steps: int):
        from transformers import get_scheduler

        t = self.config.train
        warmup = t.warmup_steps if t.warmup_steps > 0 else int(math.ceil(t.warmup_ratio * total_steps))
        return get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                             num_training_steps=total_steps)

    def _report_data(self, accelerator, output_dir: Path, *datasets: Dataset | None) -> None:
        reports = [d.report for d in datasets if d is not None]
        if not accelerator.is_main_process:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        rejects = output_dir / "rejected_records.jsonl"
        rejects.unlink(missing_ok=True)
        for report in reports:
            log.info("data %s", report.summary())
            for note in report.notes:
                log.warning("data %s: %s", report.name, note)
            report.write_rejects(rejects)
            if report.rejects:
                log.warning("data %s: %d record(s) skipped, written to %s", report.name,
                            len(report.rejects), rejects)
        (output_dir / "data_report.json").write_text(json.dumps([r.as_dict() for r in reports], indent=2))


class DPOTrainer(Trainer):
    """Preference optimisation; the loss defaults to ``dpo`` (any registered loss works)."""
    default_loss = "dpo"


class SFTTrainer(Trainer):
    """Supervised fine-tuning on the chosen / desirable / target completions."""
    default_loss = "sft"

    def __init__(self, model: Any = None, *, args: RunConfig | None = None, **kwargs):
        super().__init__(model, None, args=args if args is not None else SFTConfig(), **kwargs)


def _flat_config(defaults: dict, kwargs: dict, target) -> None:
    built = config_from_flat(defaults, kwargs)
    for f in fields(RunConfig):
        setattr(target, f.name, getattr(built, f.name))


class DPOConfig(RunConfig):
    """A RunConfig from flat TRL-style keywords: ``DPOConfig(output_dir="out", learning_rate=5e-7,
    per_device_train_batch_size=8, max_length=512, beta=0.1)``. Section names (``data={...}``) and
    dotted keys (``**{"data.max_length": 512}``) work too; the loss defaults to ``dpo``."""
    defaults = {"loss": "dpo"}

    def __init__(self, **kwargs):
        _flat_config(self.defaults, kwargs, self)


class SFTConfig(DPOConfig):
    """Like DPOConfig, with the ``sft`` loss and an SFT learning rate (2e-5) by default."""
    defaults = {"loss": "sft", "train": {"learning_rate": 2e-5}}
