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
loss, averaged over the micro-batches of a step and logged as ``loss/<name>``. The trainer
builds the pieces (tokenizer, model, reference strategy, objective, data, optimizer,
schedule), hands them to accelerate, and runs prefopt.train.loop; the CLI goes through the
same code. The config passed in is copied, never modified.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prefopt import console
from prefopt.callbacks import Callbacks
from prefopt.config import RunConfig, parse_loss, save_config, to_dict
from prefopt.configs import CPOConfig, DPOConfig, KTOConfig, ORPOConfig, RewardConfig, SFTConfig
from prefopt.data.cache import cached_prepare
from prefopt.data.collate import Collator
from prefopt.data.pipeline import Dataset, prepare_datasets
from prefopt.data.report import DataReport, DataUnusable, write_reports
from prefopt.data.roles import expand_roles
from prefopt.data.stream import StreamedData, StreamLoader, first_examples, stream_train_data
from prefopt.errors import ConfigError
from prefopt.objective import Objective
from prefopt.attention import SPLIT_SDPA, attn_implementation, set_attention
from prefopt.logps import Scoring, unwrap_model
from prefopt.losses import get_spec
from prefopt.lora import without_frozen_weights
from prefopt.report import report_at_end
from prefopt.train.trackers import flat_config, logging_dir, resolve_trackers, tracker_init_kwargs
from prefopt.reference import ReferenceContext, build_reference, reference_source
from prefopt.scoring import Plan, Probe, architecture_key, plan_scoring, reuse_plan
from prefopt.train import batches, loop
from prefopt.train.metrics import prefixed
from prefopt.trl_methods import (UNUSED_ARGUMENTS, TRLMethods, check_optimizers, four_bit, refuse_trl_arguments,
                                  train_output)
from prefopt.train.checkpoint import claim_output_dir, save_final
from prefopt.train.distributed import check_process_group, configure_deepspeed

log = logging.getLogger("prefopt")


class Trainer(TRLMethods):
    """Train any objective from the registry. Subclasses only change defaults.

    The positional order is TRL's DPOTrainer's: (model, ref_model, args, data_collator,
    train_dataset, eval_dataset, processing_class, compute_metrics, callbacks, optimizers,
    quantization_config, peft_config)."""
    default_loss: str = "dpo"
    model_kind: str = "causal"  # "reward": a sequence classifier with one output (RewardTrainer)
    config_class: type = DPOConfig

    def __init__(self, model: Any = None, ref_model: Any = None, args: RunConfig | None = None,
                 data_collator: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, compute_metrics: Any = None, callbacks: list | None = None,
                 optimizers: tuple = (None, None), quantization_config: Any = None, peft_config: Any = None, *,
                 tokenizer: Any = None, loss: Any = None, extra_losses: dict[str, Callable] | None = None,
                 **loss_params):
        refuse_trl_arguments(data_collator=data_collator, compute_metrics=compute_metrics, **loss_params)
        loss_params = {k: v for k, v in loss_params.items() if k not in UNUSED_ARGUMENTS}  # TRL's, left at None
        config = copy.deepcopy(args) if args is not None else self.config_class()
        if not isinstance(config, RunConfig):
            raise ConfigError(f"args: expected a prefopt config (DPOConfig(...), load_config(...)), got "
                              f"{type(config).__name__}; build it with prefopt's DPOConfig and the same arguments")
        if loss is not None or loss_params:
            terms = to_dict(config.loss) if loss is None else loss
            if loss_params:  # beta=..., label_smoothing=...: parameters of the one loss
                single = terms if not isinstance(terms, list) else terms[0] if len(terms) == 1 else None
                if single is None:
                    raise ConfigError(f"loss parameters {sorted(loss_params)} given as keywords, but the "
                                      f"objective has several losses; pass loss=[{{name: ..., ...}}, ...]")
                terms = {**({"name": single} if isinstance(single, str) else to_dict(single)
                            if not isinstance(single, dict) else single), **loss_params}
            config.loss = parse_loss(terms)
        if ref_model is not None and ref_model is model and not isinstance(model, (str, Path)):
            raise ConfigError("ref_model is the policy itself: it would be frozen and become its own "
                              "reference; pass ref_model=None for a frozen copy of the initial policy")
        if quantization_config is not None:
            config.model.load_in_4bit = four_bit(quantization_config)
        if peft_config is not None:  # TRL's argument: a peft.LoraConfig (or a mapping of its fields)
            from prefopt.lora import lora_config, lora_dict
            peft_config = lora_config(peft_config)
            config.model.lora = lora_dict(peft_config)
        self._optimizers = check_optimizers(optimizers, model, peft_config is not None or config.model.lora)
        self._peft_config = peft_config
        self.config = self.args = config
        if any(get_spec(t.name).scores == "reward" for t in config.loss):
            self.model_kind = "reward"  # a reward-model loss trains a sequence classifier, whatever the class
        self._model_arg = model
        self._ref_model_arg = ref_model
        self._train_source = train_dataset
        self._eval_source = eval_dataset
        self._tokenizer_arg = tokenizer if tokenizer is not None else processing_class
        self._extra_losses = extra_losses
        self.job: loop.Job | None = None
        self.train_state = None  # prefopt.train.checkpoint.TrainState after train()
        self.final_eval: dict = {}  # the last eval row of train() (eval/ names, as in metrics.jsonl)
        self.events = Callbacks(callbacks, config)
        self._plans: dict = {}  # scoring plans by model architecture (prefopt.scoring)

    @property
    def state(self):
        """transformers' TrainerState: global_step, epoch, log_history (TRL's names; eval rows ``eval_*``)."""
        return self.events.state

    def add_callback(self, callback) -> None:
        self.events.callbacks.append(callback() if isinstance(callback, type) else callback)

    @classmethod
    def from_config(cls, config: RunConfig) -> "Trainer":
        return cls(args=config)

    # ------------------------------------------------------------------ public API
    def train(self, resume_from_checkpoint: str | bool | None = None):
        """Train once; returns transformers' ``TrainOutput(global_step, training_loss, metrics)``
        (``metrics``: train_runtime, train_samples_per_second, train_steps_per_second, train_loss,
        epoch, and the last evaluation as ``eval_*``). ``resume_from_checkpoint``: a checkpoint
        directory, or True for the latest (train.resume_from)."""
        from transformers.trainer_utils import TrainOutput

        if self.train_state is not None:
            raise ConfigError("this trainer has already trained; build a new trainer to train again "
                              "(train.resume_from continues from a checkpoint)")
        began = time.perf_counter()
        if resume_from_checkpoint:
            self.config.train.resume_from = "latest" if resume_from_checkpoint is True else str(resume_from_checkpoint)
        job = self.setup()
        if job.train_loader is None:
            raise ConfigError("no training data: pass train_dataset or set data.train")
        claim_output_dir(job.output_dir, job.config.train.overwrite_output_dir, bool(job.config.train.resume_from),
                         job.accelerator)
        if job.accelerator.is_main_process:
            save_config(job.config, job.output_dir / "config.yaml")
            log.info("objective: %s | reference: %s | %d optimizer steps (%s per epoch)",
                     " + ".join(f"{t.weight:g}*{t.spec.name}" for t in job.objective.terms),
                     getattr(job.objective.reference, "description", job.objective.reference.name),
                     job.total_steps, job.steps_per_epoch or "streamed: unknown")
        if self._trackers:
            job.accelerator.init_trackers(job.config.train.run_name or job.output_dir.name or "prefopt",
                                          config=flat_config(to_dict(job.config)),
                                          init_kwargs=tracker_init_kwargs(self._trackers, job.output_dir))
        started = time.perf_counter()
        try:
            self.train_state, self.final_eval = loop.train(job)
        except (loop.Interrupted, loop.NonFiniteLossError):  # stops every process agrees on
            self._report_streamed(job)
            raise
        finally:
            self._restore_attention()
            if self._trackers:
                job.accelerator.end_training()
        self._report_streamed(job)
        step, loss, metrics = train_output(self.state, self.train_state, time.perf_counter() - started,
                                           job.config.train.per_device_train_batch_size
                                           * job.config.train.gradient_accumulation_steps * job.accelerator.num_processes)
        self.events.log(job, step, dict(metrics))  # the final row, through on_log, as transformers sends it
        self.events.train_end(job, self.train_state)
        metrics.update({f"eval_{k[5:]}": v for k, v in self.final_eval.items()})
        if job.config.save.push_to_hub:
            self.push_to_hub()  # every process calls it: it may save (collective) before the main one uploads
        if job.accelerator.is_main_process:
            report_at_end(job.output_dir, job.config.train.report_html)
            console.show_summary(job.output_dir, self.train_state.step, job.total_steps, time.perf_counter() - began,
                                 self.train_state.skipped_steps, resumed=bool(job.config.train.resume_from))
        return TrainOutput(step, loss, metrics)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list | None = None, metric_key_prefix: str = "eval",
                 *, on: str | None = None) -> dict:
        """Objective metrics of the current model, named as transformers' Trainer names them
        (``eval_loss``, ``eval_rewards/accuracies``...; metrics.jsonl writes ``eval/loss``).

        On the eval data by default; ``eval_dataset`` (any data form) evaluates other data;
        ``on="train"`` the training examples, in order, with the eval batch size (e.g. the reward
        accuracy on the training pairs). Every example counts once, on any number of processes.
        ``metric_key_prefix="eval/"`` gives metrics.jsonl's names. The result is logged to
        ``state.log_history`` and the callbacks' on_log / on_evaluate."""
        job = self.setup()
        if eval_dataset is not None:
            loader = self._eval_loader(self._encode_eval(eval_dataset))
        elif on == "train":
            if self._train_set is None:
                raise ConfigError("evaluate(on='train') needs training data")
            loader = self._eval_loader(self._train_set)
        elif on in (None, "eval"):
            loader = job.eval_loader
            if loader is None:
                raise ConfigError("evaluate() needs eval data: eval_dataset, data.eval or data.eval_split_size")
        else:
            raise ConfigError(f"evaluate(on={on!r}): expected 'train' or 'eval'")
        try:
            values = loop.evaluate(job.accelerator, job.model, job.objective, loader)
        finally:
            self._restore_attention()
        values = {k: v for k, v in values.items() if k not in (ignore_keys or ())}
        step = self.train_state.step if self.train_state is not None else 0
        self.events.log(job, step, prefixed("eval/", values))
        self.events.evaluated(job, step, prefixed("eval/", values))
        joint = "" if metric_key_prefix.endswith("/") else "_"  # "eval/": the names of metrics.jsonl
        return {f"{metric_key_prefix}{joint}{k}": v for k, v in values.items()}

    def _encode_eval(self, source: Any) -> Dataset:
        """Read and encode data given to evaluate(eval_dataset=...) as the eval data is."""
        job = self.job
        _, data = prepare_datasets(self.config.data, job.tokenizer, job.objective.kind, train_source=None,
                                   eval_source=source, seed=self.config.train.seed,
                                   required_columns=job.objective.columns,
                                   optional_columns=job.objective.optional_columns,
                                   record_checks=job.objective.record_checks)
        data.examples = expand_roles(data.examples, job.objective.roles)
        return data

    def _restore_attention(self) -> None:
        """Give the user's models back their own attention implementation (prefopt's split SDPA is
        registered in this process only; scoring switches it on again when it runs)."""
        for model in (self.job.model, getattr(self.job.objective.reference, "model", None)):
            if model is not None and attn_implementation(unwrap_model(model)) == SPLIT_SDPA:
                set_attention(unwrap_model(model), "sdpa")

    def save_model(self, output_dir: str | Path | None = None, _internal_call: bool = False) -> Path:
        """Save model + tokenizer in HF format (default OUTPUT_DIR/final), from every process's
        shards under FSDP/ZeRO-3, written once."""
        job = self.setup()
        return save_final(job.accelerator, job.model, job.tokenizer, job.config, job.output_dir, output_dir)

    @property
    def model(self):
        return self.job.accelerator.unwrap_model(self.job.model) if self.job else self._model_arg

    # ------------------------------------------------------------------ assembly
    def setup(self) -> loop.Job:
        """Build every piece once (model, reference, objective, data, optimizer, schedule)."""
        if self.job is not None:
            return self.job
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType, set_seed

        cfg, tcfg = self.config, self.config.train
        if min(tcfg.gradient_accumulation_steps, tcfg.per_device_train_batch_size, tcfg.per_device_eval_batch_size) < 1:
            raise ConfigError("train.per_device_train_batch_size, per_device_eval_batch_size and "
                              "gradient_accumulation_steps must be >= 1")
        if tcfg.max_consecutive_skips < 1:
            raise ConfigError(f"train.max_consecutive_skips must be >= 1 (got {tcfg.max_consecutive_skips})")
        # Under torchrun on a machine without CUDA, accelerate only forms the gloo process group
        # when asked for CPU explicitly; otherwise each process would silently train alone.
        # (Not under DeepSpeed or FSDP: forcing CPU would silently turn them into plain DDP; DeepSpeed
        # runs on CPU with DS_ACCELERATOR=cpu and gloo.)
        sharded_launch = any(os.environ.get(v, "").lower() in ("true", "1")
                             for v in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"))
        distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() \
            and not sharded_launch
        # accelerate keeps one process-wide state; a second trainer in the same process (SFT in
        # fp32, then DPO in bf16) needs its own precision. The process group (PartialState) stays.
        AcceleratorState._reset_state(reset_partial_state=False)
        # The schedule counts optimizer steps: accelerate must not step it once per process.
        output_dir = Path(cfg.output_dir)
        self._trackers = resolve_trackers(tcfg.report_to)
        precision = resolve_precision(tcfg.mixed_precision)
        options = dict(cpu=distributed_cpu, step_scheduler_with_optimizer=False, log_with=self._trackers or None,
                       project_dir=str(logging_dir(output_dir)))
        accelerator = Accelerator(mixed_precision=precision, **options)
        if precision == "fp16" and not accelerator.native_amp \
                and accelerator.distributed_type != DistributedType.DEEPSPEED:
            # accelerate does fp16 (autocast, loss scaling) on GPUs only; on CPU it silently trains float32
            # while its state says fp16 (the precision line, the reference cache key, the probe's tolerance).
            # A warning, not an error: a GPU recipe still runs on a laptop; and the state is made true.
            if accelerator.is_main_process:
                log.warning("train.mixed_precision=fp16: accelerate has no fp16 autocast or loss scaling on %s; "
                            "this run trains in float32 (as with train.mixed_precision=no)", accelerator.device.type)
            AcceleratorState._reset_state(reset_partial_state=False)
            accelerator = Accelerator(mixed_precision="no", **options)
        set_seed(tcfg.seed)
        console.configure(progress=tcfg.progress_bar, main=accelerator.is_main_process)

        tokenizer = self._build_tokenizer()
        model = self._build_model()
        if self.model_kind == "reward":
            # transformers' own pooling (which prefopt does not use) needs a pad token id to run
            model.config.pad_token_id = tokenizer.pad_token_id
        needed, needed_by = Objective.requirements(cfg.loss)
        ref_model = reference_source(cfg.reference, self._ref_model_arg, model, needed, self._model_path())
        reference = build_reference(cfg.reference, cfg.model, needed=needed, needed_by=needed_by,
                                    policy=model, ref_model=ref_model)
        objective = Objective.from_config(cfg.loss, reference, self._extra_losses)

        train_set, eval_set = self._datasets(accelerator, tokenizer, objective, output_dir)
        if isinstance(train_set, StreamedData):  # length unknown: train.max_steps is required
            train_loader, steps_per_epoch = StreamLoader(train_set, self._collator, tcfg.per_device_train_batch_size,
                                                         accelerator.device), None
        else:
            train_loader = (batches.train_loader(train_set.examples, self._collator, tcfg.per_device_train_batch_size,
                                                 tcfg.seed, accelerator, max_tokens=cfg.data.max_tokens_per_batch,
                                                 group_by_length=cfg.data.group_by_length)
                            if train_set is not None else None)
            # Counted on the prepared (per-process) loader: with N processes an epoch is N times shorter.
            steps_per_epoch = max(1, math.ceil(len(train_loader) / tcfg.gradient_accumulation_steps)) \
                if train_loader is not None else 1
        eval_loader = self._eval_loader(eval_set, accelerator) if eval_set is not None else None
        total_steps = tcfg.max_steps if tcfg.max_steps > 0 else max(1, math.ceil(tcfg.num_train_epochs * steps_per_epoch))

        optimizer, scheduler = self._optimizers
        optimizer = optimizer or self._optimizer(model)
        scheduler = scheduler or self._scheduler(optimizer, total_steps)
        check_process_group(accelerator)
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            configure_deepspeed(accelerator, tcfg)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        accelerator.register_save_state_pre_hook(without_frozen_weights)
        if cfg.save.merge_lora and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ConfigError("save.merge_lora under FSDP/DeepSpeed: the adapters would be merged into a shard of "
                              "the base. Save the adapter (save.merge_lora: false) and merge it into the base "
                              "afterwards with PeftModel.from_pretrained(base, adapter).merge_and_unload()")
        plan = self._plan_scoring(model, accelerator, objective, cfg.data.layout)
        self._collator.use(plan.layout)
        objective.scoring = plan.scoring
        reference.prepare(ReferenceContext(
            accelerator, model, self._collator,
            plan=lambda ref: self._plan_scoring(ref, accelerator, objective, plan.layout, "reference").scoring,
            datasets={name: d.examples for name, d in (("train", train_set), ("eval", eval_set))
                      if isinstance(d, Dataset)},
            batch_size=tcfg.per_device_eval_batch_size, output_dir=output_dir, token_level=objective.token_level,
            probe=Probe(self._probe_examples(), self._collator.pad_id, objective.roles, cfg.data.max_length,
                        accelerator.device, accelerator.autocast, accelerator.mixed_precision),
            tokenizer=tokenizer))
        if accelerator.num_processes > 1:  # KTO's z0 and BCO's δ: statistics over every process
            objective.reduce_mean = lambda t: accelerator.reduce(t, reduction="mean")
        # A stateful loss (BCO's running reward mean) is saved in checkpoints as loss_state.json by
        # prefopt.train.checkpoint, not registered with accelerate, which would pickle it and load it
        # back with torch.load(weights_only=False): running code from a tampered checkpoint.
        hooks = [objective.reference.after_optimizer_step] if hasattr(objective.reference, "after_optimizer_step") \
            else []
        self.job = loop.Job(cfg, accelerator, model, tokenizer, objective, optimizer, scheduler,
                            train_loader, eval_loader, output_dir, total_steps, steps_per_epoch, hooks, self.events)
        return self.job

    def _datasets(self, accelerator, tokenizer, objective: Objective, output_dir: Path):
        """Read, encode and report the data; give every example its roles; build the collator and
        check every loss on a first batch."""
        cfg, tcfg = self.config, self.config.train
        columns = (objective.columns, objective.optional_columns, objective.record_checks)
        streamed = None
        data_cfg, train_source = cfg.data, self._train_source
        if cfg.data.streaming:  # the train data is read as training consumes it; the eval data in memory
            streamed = self._streamed(accelerator, tokenizer, objective, columns)
            data_cfg, train_source = dataclasses.replace(cfg.data, train=None), None
        try:
            train_set, eval_set = cached_prepare(
                lambda: prepare_datasets(
                    data_cfg, tokenizer, objective.kind, train_source=train_source,
                    eval_source=self._eval_source, seed=tcfg.seed, required_columns=objective.columns,
                    optional_columns=objective.optional_columns, record_checks=objective.record_checks),
                data_cfg, tokenizer, objective.kind, train_source=train_source, eval_source=self._eval_source,
                seed=tcfg.seed, columns=columns, accelerator=accelerator)
        except DataUnusable as stop:  # nothing left to train on: keep the reasons on disk first
            self._report_data(accelerator, output_dir, *stop.reports)
            raise
        self._report_data(accelerator, output_dir, *(d.report for d in (train_set, eval_set) if d is not None))
        for data in (train_set, eval_set):
            if data is not None:
                data.examples = expand_roles(data.examples, objective.roles)
        train_set = streamed or train_set
        self._train_set, self._eval_set = train_set, eval_set
        self._collator = Collator("padded", tokenizer.pad_token_id, objective.roles, extras=objective.extra_columns,
                                  pad_to_multiple_of=cfg.data.pad_to_multiple_of,
                                  max_tokens_per_row=cfg.data.max_tokens_per_row)
        for data, size in ((train_set, tcfg.per_device_train_batch_size), (eval_set, tcfg.per_device_eval_batch_size)):
            if data is not None:
                objective.preflight(self._collator(first_examples(data, size)))
        return train_set, eval_set

    def _report_streamed(self, job) -> None:
        """Streamed train data: its report filled as the data was read; written at the run's end."""
        if isinstance(self._train_set, StreamedData):
            self._report_data(job.accelerator, job.output_dir, self._train_set.gathered_report(job.accelerator),
                              *([self._eval_set.report] if self._eval_set else []))

    def _streamed(self, accelerator, tokenizer, objective: Objective, columns: tuple) -> StreamedData:
        source = self._train_source if self._train_source is not None else self.config.data.train
        return stream_train_data(self.config, source, accelerator, tokenizer, objective.kind, columns, objective.roles)

    def _plan_scoring(self, model, accelerator, objective: Objective, layout: str, what: str = "policy"):
        """Settle the layout and LM-head mode ``model`` runs exactly (prefopt.scoring), checked on the
        two shortest examples; a reference of the policy's architecture reuses the policy's plan."""
        from accelerate.utils import DistributedType

        data = self._train_set or self._eval_set
        if data is None:
            return Plan("padded", Scoring.for_model(model))
        key = architecture_key(model)
        known = self._plans.get(key)
        if known is not None and layout in ("auto", known.layout):
            return reuse_plan(model, known)
        cfg = self.config
        probe = Probe(self._probe_examples(), self._collator.pad_id, objective.roles, cfg.data.max_length,
                      accelerator.device, accelerator.autocast, accelerator.mixed_precision,
                      sharded=accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED),
                      log_notes=accelerator.is_main_process)
        if accelerator.num_processes > 1:  # every process must take the same path
            probe.agree = lambda worst: float(accelerator.reduce(
                torch.tensor(worst, device=accelerator.device), reduction="max"))
        plan = plan_scoring(model, probe, layout=layout, head="reward" if objective.rewards else cfg.model.lm_head,
                            chunk_size=cfg.model.lm_head_chunk_size, what=what)
        self._plans[key] = plan
        if what == "policy" and accelerator.is_main_process:
            precision = {"no": "float32"}.get(accelerator.mixed_precision, f"{accelerator.mixed_precision} autocast")
            log.info("layout: %s | LM head: %s | attention: %s | precision: %s", plan.layout, plan.scoring.head,
                     plan.scoring.attn, precision)
        return plan

    def _probe_examples(self) -> list:
        """The two shortest examples: what the setup checks run on."""
        data = self._train_set or self._eval_set
        return sorted(first_examples(data, None), key=batches.example_tokens)[:2] if data is not None else []

    def _eval_loader(self, data: Dataset, accelerator=None):
        if isinstance(data, StreamedData):
            raise ConfigError("data.streaming: the training data is read as training consumes it, not held; "
                              "evaluating or calibrating on it (on='train') needs it in memory")
        accelerator = accelerator or self.job.accelerator
        return batches.eval_loader(data.examples, self._collator, self.config.train.per_device_eval_batch_size,
                                   accelerator)

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
        """The policy: loaded (4-bit for QLoRA) or given, dropout off, LoRA adapters when asked,
        gradient checkpointing when asked."""
        from prefopt.lora import apply_lora, is_peft_model
        from prefopt.models import disable_dropout, load_model
        from prefopt.vlm import freeze_vision, is_vlm

        mcfg = self.config.model
        lora = self._peft_config if self._peft_config is not None else mcfg.lora
        if mcfg.load_in_4bit and lora is None and not is_peft_model(self._model_arg):
            raise ConfigError("model.load_in_4bit trains LoRA adapters on a 4-bit base (QLoRA): set model.lora "
                              "(e.g. {r: 16, alpha: 32}) or pass peft_config=LoraConfig(...)")
        if isinstance(self._model_arg, torch.nn.Module):
            if mcfg.name_or_path is None:
                mcfg.name_or_path = getattr(self._model_arg.config, "_name_or_path", None) or None
            model = self._model_arg
        else:
            path = self._model_path()
            if path is None:
                raise ConfigError("no model: pass model= or set model.name_or_path")
            mcfg.name_or_path = path
            model = load_model(path, mcfg.dtype, mcfg, kind=self.model_kind)
        if lora is not None and not is_peft_model(model):
            model = apply_lora(model, lora, quantized=mcfg.load_in_4bit, gradient_checkpointing=mcfg.gradient_checkpointing,
                               task_type="SEQ_CLS" if self.model_kind == "reward" else "CAUSAL_LM",
                               train_vision=mcfg.train_vision)
        if is_vlm(model) and not mcfg.train_vision:  # prefopt.vlm: the vision tower stays as it is
            freeze_vision(model)
        if mcfg.disable_dropout:  # after LoRA: its dropout would make the policy's log-probs noisy too
            disable_dropout(model)
        if mcfg.gradient_checkpointing:
            enable_checkpointing(model)
        return model

    def _optimizer(self, model) -> torch.optim.Optimizer:
        t = self.config.train
        params = [p for p in model.parameters() if p.requires_grad]
        # no decay on biases and norm weights; under ZeRO-3 a parameter is a flat partition and
        # its own shape is ds_shape
        decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]
        no_decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) < 2]
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("true", "1"):
            # DeepSpeed drops an empty group, and the schedule would then have one learning rate too
            # many (elsewhere both groups stay, so checkpoints keep their optimizer layout)
            groups = [g for g in groups if g["params"]]
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)

    def _scheduler(self, optimizer, total_steps: int):
        from transformers import get_scheduler

        t = self.config.train
        warmup = t.warmup_steps if t.warmup_steps > 0 else int(math.ceil(t.warmup_ratio * total_steps))
        return get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                             num_training_steps=total_steps, scheduler_specific_kwargs=t.lr_scheduler_kwargs or None)

    def _report_data(self, accelerator, output_dir: Path, *reports: DataReport) -> None:
        if accelerator.is_main_process:
            write_reports(output_dir, list(reports))


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant (transformers 5 renamed the method)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def resolve_precision(mixed_precision: str) -> str:
    """'auto': bf16 autocast on a CUDA GPU with bf16 support; float32 elsewhere (on CPU, bf16 was
    slower than float32 in every measurement, with or without bf16 instructions)."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


class DPOTrainer(Trainer):
    """Preference optimisation; the loss defaults to ``dpo`` (any registered loss works)."""
    default_loss = "dpo"


class KTOTrainer(Trainer):
    """KTO on unpaired data (``{prompt, completion, label}``); TRL's KTOTrainer arguments."""
    default_loss = "kto"
    config_class = KTOConfig


class _NoReference(Trainer):
    """TRL's trainers without ref_model: (model, args, data_collator, train_dataset, eval_dataset,
    processing_class, ...) in TRL's order, keywords after the first six."""

    def __init__(self, model: Any = None, args: RunConfig | None = None, data_collator: Any = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None, **kwargs):
        super().__init__(model, None, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs)


class CPOTrainer(_NoReference):
    """CPO (no reference); CPOConfig(loss_type='simpo') is SimPO, as in TRL."""
    default_loss = "cpo"
    config_class = CPOConfig


class ORPOTrainer(_NoReference):
    """ORPO (no reference); beta is ORPO's λ."""
    default_loss = "orpo"
    config_class = ORPOConfig


class RewardTrainer(_NoReference):
    """A Bradley–Terry reward model (``prefopt rm``): AutoModelForSequenceClassification with one
    output, trained on preference pairs; the reward of (x, y) is read at y's last token."""
    default_loss = "bradley_terry"
    model_kind = "reward"
    config_class = RewardConfig

    def calibration(self, on: str = "eval") -> dict:
        """Pairwise accuracy and the calibration table (prefopt.rewards.calibration) on the eval
        data (``on="train"``: the training pairs), gathered over every process."""
        from accelerate.utils import gather_object

        from prefopt.rewards import calibration, pair_rewards

        job = self.setup()
        data = self._eval_set if on == "eval" else self._train_set
        if data is None:
            raise ConfigError(f"calibration(on={on!r}): no {on} data")
        chosen, rejected = pair_rewards(job.model, self._eval_loader(data), job.objective.scoring)
        if job.accelerator.num_processes > 1:
            pairs = gather_object(list(zip(chosen.tolist(), rejected.tolist())))
            chosen, rejected = torch.tensor([c for c, _ in pairs]), torch.tensor([r for _, r in pairs])
        return calibration(chosen, rejected)


class SFTTrainer(_NoReference):
    """Supervised fine-tuning on the chosen / desirable / target completions."""
    default_loss = "sft"
    config_class = SFTConfig
