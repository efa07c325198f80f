"""TRL-style callbacks and ``trainer.state``: the loop's events (prefopt.train.events) told
to transformers ``TrainerCallback``s, with a transformers ``TrainerState`` kept up to date.

The events called: on_train_begin, on_epoch_begin, on_step_begin, on_step_end, on_epoch_end,
on_log, on_evaluate, on_save, on_train_end (not on_init_end, on_substep_end, the optimizer-step
events, on_prediction_step, on_predict nor on_push_begin). Each is called as transformers'
Trainer calls it: ``(args, state, control,
**kwargs)`` with ``model``, ``processing_class``, ``optimizer``, ``lr_scheduler``,
``train_dataloader`` and ``eval_dataloader`` in kwargs, ``logs=`` for ``on_log`` and
``metrics=`` for ``on_evaluate``; a method that returns a ``TrainerControl`` replaces the
control. ``control.should_training_stop`` ends training at the step's end (the final model
is saved, and evaluated unless that step just was), ``should_save`` writes a checkpoint,
``should_evaluate`` evaluates and ``should_log`` logs at that step, whichever event of the
step set them. ``args`` is the run's config, which answers TRL's flat names
(``args.learning_rate``, ``args.beta``...). Metric names follow transformers': the log rows of
``log_history`` and ``on_log`` carry eval metrics as ``eval_<name>`` (``eval_loss``,
``eval_rewards/accuracies``); metrics.jsonl and the trackers keep ``eval/<name>``, as
transformers' tracker callbacks rename them.
"""
from __future__ import annotations

from typing import Any

from prefopt.train.events import Events
from prefopt.train.metrics import read_rows

EVENTS = ("on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_step_begin",
          "on_pre_optimizer_step", "on_optimizer_step", "on_substep_end", "on_step_end", "on_evaluate",
          "on_predict", "on_save", "on_log", "on_prediction_step", "on_push_begin")


def hf_names(values: dict) -> dict:
    """``eval/loss`` -> ``eval_loss`` (the names transformers' Trainer returns and logs)."""
    return {("eval_" + k[5:] if k.startswith("eval/") else k): v for k, v in values.items()}


class Callbacks(Events):
    def __init__(self, callbacks: list | None, args: Any):
        super().__init__()
        from transformers import TrainerControl, TrainerState

        self.callbacks = [c() if isinstance(c, type) else c for c in (callbacks or [])]
        for cb in self.callbacks:
            if not any(callable(getattr(cb, name, None)) for name in EVENTS):
                raise TypeError(f"callbacks: {cb!r} has none of TrainerCallback's methods (on_log, on_step_end, ...)")
        self.args = args
        self.state = TrainerState()
        self.control = TrainerControl()

    # ------------------------------------------------------------------ dispatch
    def _call(self, event: str, job: Any, **kwargs) -> None:
        extra = dict(model=job.accelerator.unwrap_model(job.model), processing_class=job.tokenizer,
                     optimizer=job.optimizer, lr_scheduler=job.scheduler, train_dataloader=job.train_loader,
                     eval_dataloader=job.eval_loader, **kwargs)
        for cb in self.callbacks:
            method = getattr(cb, event, None)
            if method is None:
                continue
            result = method(self.args, self.state, self.control, **extra)
            if result is not None:
                self.control = result
        self.stop = self.stop or self.control.should_training_stop
        self.save = self.save or self.control.should_save
        self.evaluate = self.evaluate or self.control.should_evaluate
        self.log_now = self.log_now or self.control.should_log
        self.control.should_save = self.control.should_evaluate = self.control.should_log = False

    def _sync(self, job: Any, step: int) -> None:
        s = self.state
        s.global_step, s.max_steps = step, job.total_steps
        if job.steps_per_epoch:
            s.epoch = step / job.steps_per_epoch
            s.num_train_epochs = max(1, -(-job.total_steps // job.steps_per_epoch))
        else:  # streamed data: its length is unknown; transformers' state for an IterableDataset
            s.epoch, s.num_train_epochs = 0.0, 1
        cfg = job.config.train
        s.logging_steps, s.eval_steps, s.save_steps = cfg.logging_steps, cfg.eval_steps, cfg.save_steps
        s.train_batch_size = cfg.per_device_train_batch_size
        s.is_local_process_zero = job.accelerator.is_local_main_process
        s.is_world_process_zero = job.accelerator.is_main_process

    # ------------------------------------------------------------------ the loop's events
    def train_begin(self, job, state) -> None:
        self._sync(job, state.step)
        # a resumed run's history: the rows of metrics.jsonl up to its checkpoint (trimmed by the main
        # process, which every process waits for)
        job.accelerator.wait_for_everyone()
        self.state.log_history = [hf_names(row) for row in read_rows(job.output_dir / "metrics.jsonl")] \
            if state.step else []
        self.control.should_training_stop = False
        self._call("on_train_begin", job)

    def epoch_begin(self, job, state) -> None:
        self._sync(job, state.step)
        self.control.should_epoch_stop = False
        self._call("on_epoch_begin", job)

    def step_begin(self, job, state) -> None:
        self._call("on_step_begin", job)

    def step_end(self, job, state) -> None:
        self._sync(job, state.step)
        self._call("on_step_end", job)

    def epoch_end(self, job, state) -> None:
        self._call("on_epoch_end", job)

    def log(self, job, step: int, values: dict) -> None:
        self._sync(job, step)
        row = {**hf_names(values), "step": step}
        row.setdefault("epoch", round(self.state.epoch, 4))
        self.state.log_history.append(row)
        self._call("on_log", job, logs=hf_names(values))

    def evaluated(self, job, step: int, values: dict) -> None:
        self._call("on_evaluate", job, metrics=hf_names(values))

    def saved(self, job, step: int, path) -> None:
        self._call("on_save", job, checkpoint=str(path))

    def train_end(self, job, state) -> None:
        self._sync(job, state.step)
        self._call("on_train_end", job)
