"""The training loop: windows of micro-batches, one optimizer step each. Nothing loss-specific.

    for each optimizer step:
        window  = the next gradient_accumulation_steps micro-batches (fewer at an epoch's end)
        units   = per-term totals over the window and all processes (examples or tokens)
        for each micro-batch: loss = objective.forward(...).loss; backward (sync on the last)
        clip; step and schedule (or skip the update when the loss or gradient is not finite); zero
        log / evaluate / checkpoint when due; on SIGTERM/SIGINT checkpoint and stop

Dividing every term by the totals of the whole step (not per micro-batch) makes any
micro-batch x accumulation x process split give the same gradient as one large batch.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from prefopt import console
from prefopt.config import RunConfig
from prefopt.data.stream import StreamLoader
from prefopt.errors import ConfigError, PrefoptError
from prefopt.objective import Objective
from prefopt.train.checkpoint import (TrainState, fault_point, load_checkpoint, load_loss_state, resolve_resume,
                                      resume_differences, save_checkpoint, save_final,
                                      set_aside_later_checkpoints)
from prefopt.train.distributed import deepspeed_backward
from prefopt.train.events import Events
from prefopt.train.metrics import MetricAccumulator, MetricsWriter, prefixed

log = logging.getLogger("prefopt")


@dataclass
class Job:
    """Everything the loop needs, built by prefopt.trainer (already passed through accelerator.prepare)."""
    config: RunConfig
    accelerator: Any
    model: torch.nn.Module
    tokenizer: Any
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Any
    eval_loader: Any
    output_dir: Path
    total_steps: int
    steps_per_epoch: int | None  # None: streamed data, its length unknown
    # called with the step number after every optimizer step (e.g. a reference that follows the policy)
    step_hooks: list = field(default_factory=list)
    events: Events = field(default_factory=Events)  # listeners: trainer.state, TRL-style callbacks


class NonFiniteLossError(PrefoptError):
    """Too many optimizer steps in a row with a non-finite loss or gradient."""


class Interrupted(PrefoptError):
    """SIGTERM/SIGINT: a checkpoint was saved and the run stopped (the CLI exits 128 + signal)."""

    def __init__(self, signum: int, message: str):
        self.signum = signum
        super().__init__(message)


class StopSignals:
    """Turns SIGTERM/SIGINT into a request to stop at the next step boundary. Every process
    agrees on the request (one all-reduce per step). A second signal more than REPEAT seconds
    after the first acts at once, as usual; one sooner is the same request arriving twice
    (Ctrl-C reaches the whole process group and torchrun forwards it to its workers too)."""

    REPEAT = 5.0

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self.at = 0.0
        self.previous: dict = {}

    def __enter__(self):
        try:
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals stay with whoever owns them
            self.previous = {}
        return self

    def _handle(self, signum, frame):
        if self.received is not None and time.monotonic() - self.at > self.REPEAT:  # asked again: stop now
            signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
        if self.received is None:
            self.received, self.at = signum, time.monotonic()

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self, acc) -> int | None:
        value = torch.tensor([self.received or 0], device=acc.device)
        if acc.num_processes > 1:
            value = acc.reduce(value, reduction="max")
        return int(value.item()) or None


def start_state(job: Job) -> TrainState:
    """A fresh state, or the checkpoint's when resuming (after checking it belongs to this run)."""
    cfg, acc = job.config.train, job.accelerator
    if not cfg.resume_from:
        return TrainState(num_processes=acc.num_processes)
    path = resolve_resume(cfg.resume_from, job.output_dir)
    blocking, changed = resume_differences(path, job.config, acc.num_processes)
    if blocking:
        raise ConfigError(f"train.resume_from: {path} is another run's checkpoint; these settings differ:\n  "
                          + "\n  ".join(blocking) + "\nResume with the checkpoint's settings, or start afresh "
                          "(another output_dir, or train.overwrite_output_dir=true)")
    state = load_checkpoint(acc, job.model, path)
    if state.stream_positions:  # streamed data: this process's place in its own share
        state.epoch, state.batch_in_epoch = state.stream_positions[acc.process_index]
    set_aside_later_checkpoints(job.output_dir, state.step, acc)
    loss_state = load_loss_state(path, acc.device)
    if loss_state is not None:
        job.objective.load_state_dict(loss_state)
    log.info("resumed from %s (step %d of %d)%s", path, state.step, job.total_steps,
             "; changed since: " + "; ".join(changed) if changed else "")
    return state


def train(job: Job) -> tuple[TrainState, dict]:
    with StopSignals() as signals:
        return _train(job, start_state(job), signals)


def _train(job: Job, state: TrainState, signals: StopSignals) -> tuple[TrainState, dict]:
    cfg, acc = job.config.train, job.accelerator
    # A resumed run keeps the metrics of the steps up to its checkpoint, not those logged after it.
    writer = MetricsWriter(job.output_dir / "metrics.jsonl", acc.is_main_process, keep_until=state.step,
                           log_fn=acc.log if acc.trackers else None)
    events = job.events
    events.train_begin(job, state)
    last_eval: dict = {}
    evaluating = job.eval_loader is not None and cfg.eval_strategy != "no"
    if cfg.eval_on_start and state.step == 0 and evaluating:
        last_eval = _log_eval(job, writer, state.step)
    window_metrics, tokens, train_seconds = MetricAccumulator(), 0, 0.0
    # A bar on a terminal; in a log file (CI, nohup) one compact line per logging step instead.
    show = acc.is_main_process and cfg.progress_bar
    interactive = show and sys.stderr.isatty()
    bar = tqdm(total=job.total_steps, initial=state.step, desc="train", dynamic_ncols=True,
               disable=not interactive)
    in_a_row, run_started, first_step = 0, time.perf_counter(), state.step
    evaluated_now, logged_at = False, state.step

    def log_now():
        nonlocal tokens, train_seconds, logged_at
        tokens = int(acc.reduce(torch.tensor(tokens, device=acc.device), reduction="sum"))
        state.num_tokens += tokens
        _log_train(job, state, writer, window_metrics, tokens, train_seconds, bar if interactive else None,
                   show and not interactive, (time.perf_counter() - run_started) / max(state.step - first_step, 1))
        window_metrics.reset()
        tokens, train_seconds, events.log_now, logged_at = 0, 0.0, False, state.step

    for window, epoch_begins, epoch_end in _windows(job, state) if state.step < job.total_steps else ():
        if epoch_begins and streamed_epochs_agree(job):
            events.epoch_begin(job, state)
        events.step_begin(job, state)
        started = time.perf_counter()
        read, outcome = optimizer_step(job, window, window_metrics)
        tokens += read
        train_seconds += time.perf_counter() - started  # eval and checkpoint time excluded
        state.step += 1
        in_a_row = in_a_row + 1 if outcome == "skipped" else 0
        if outcome != "updated":
            state.skipped_steps += 1
            log.warning("step %d skipped: %s (%d skipped so far)", state.step,
                        "non-finite loss or gradient" if outcome == "skipped" else
                        "fp16 gradient overflow, the loss scale is lowered", state.skipped_steps)
        for hook in job.step_hooks:
            hook(state.step)
        fault_point("step", state.step)
        bar.update(1)
        events.step_end(job, state)
        if epoch_end and streamed_epochs_agree(job):
            events.epoch_end(job, state)
        if state.step % cfg.logging_steps == 0 or state.step == job.total_steps or events.stop or events.log_now \
                or (cfg.logging_first_step and state.step == 1):
            log_now()
        # requests of the callbacks (control.should_*), from any event of this step, act at this step
        evaluated_now = evaluating and (events.evaluate or _due(cfg.eval_strategy, cfg.eval_steps, state.step,
                                                                epoch_end))
        if evaluated_now:
            last_eval = _log_eval(job, writer, state.step)
        events.evaluate = False
        saved = None
        if events.save or _due(cfg.save_strategy, cfg.save_steps, state.step, epoch_end):
            saved = _save(job, state, cfg.save_total_limit)
        events.save = False
        if in_a_row >= cfg.max_consecutive_skips:
            path = saved or _save(job, state, None)
            raise NonFiniteLossError(
                f"steps {state.step - in_a_row + 1}..{state.step} in a row had a non-finite loss or gradient "
                f"(train.max_consecutive_skips={cfg.max_consecutive_skips}); stopped with a checkpoint in {path}. "
                "Likely causes: fp16 overflow (use train.mixed_precision=bf16 or no), a learning rate too "
                "high (the loss grew before), empty or fully truncated completions (see data_report.json)")
        signum = signals.requested(acc)
        if signum:
            path = saved or _save(job, state, None)
            bar.close()
            raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} at step {state.step} of "
                                      f"{job.total_steps}: checkpoint saved in {path}; continue with "
                                      f"train.resume_from=latest")
        if events.stop and logged_at < state.step:  # asked after this step's logging: its row first
            log_now()
        if state.step >= job.total_steps or events.stop:  # a callback's control.should_training_stop
            break
    bar.close()
    if evaluating and not evaluated_now:  # the end's evaluation, unless the last step had one
        last_eval = _log_eval(job, writer, state.step)
    save_final(acc, job.model, job.tokenizer, job.config, job.output_dir)
    return state, last_eval  # the caller logs the run's summary row, then tells events.train_end


def _log_train(job: Job, state: TrainState, writer: MetricsWriter, window_metrics: MetricAccumulator, tokens: int,
               seconds: float, bar, plain: bool, seconds_per_step: float) -> None:
    """The logging step's row: metrics.jsonl, the listeners, and the bar (terminal) or one line (logs)."""
    means = window_metrics.means(job.accelerator)  # empty when every step of the window was skipped
    logged = job.objective.summarize(means) if means else {}
    logged.update(learning_rate=job.scheduler.get_last_lr()[0], epoch=epoch_of(job, state),
                  tokens_per_second=tokens / max(seconds, 1e-9), num_tokens=state.num_tokens,
                  skipped_steps=state.skipped_steps)
    writer.write(state.step, logged)
    job.events.log(job, state.step, logged)
    if bar is not None:
        bar.set_postfix(console.postfix(logged))
    elif plain:
        headline = {k: f"{logged[k]:.4g}" for k in ("loss", "rewards/accuracies") if k in logged}
        log.info("step %d/%d %s grad norm %.3g lr %.3g, %.0f tokens/s, batch fill %.2f, ETA %s", state.step,
                 job.total_steps, " ".join(f"{k} {v}" for k, v in headline.items()),
                 logged.get("grad_norm", math.nan), logged["learning_rate"], logged["tokens_per_second"],
                 logged.get("batch_fill", math.nan), _clock(seconds_per_step * (job.total_steps - state.step)))


def _save(job: Job, state: TrainState, keep: int | None) -> Path:
    """A resumable checkpoint, told to the listeners (on_save)."""
    if isinstance(job.train_loader, StreamLoader):  # every process's own place in its share
        from accelerate.utils import gather_object
        state.stream_positions = [list(p) for p in gather_object([(state.epoch, state.batch_in_epoch)])] \
            if job.accelerator.num_processes > 1 else [[state.epoch, state.batch_in_epoch]]
    path = save_checkpoint(job.accelerator, job.model, job.tokenizer, state, job.config, job.output_dir, keep,
                           _loss_state(job))
    job.events.saved(job, state.step, path)
    return path


def _due(strategy: str, every: int, step: int, epoch_end: bool) -> bool:
    """Evaluate / checkpoint now? ``steps``: every N steps (0: never during training);
    ``epoch``: at each epoch's end; ``no``: never."""
    return (strategy == "steps" and bool(every) and step % every == 0) or (strategy == "epoch" and epoch_end)


def _loss_state(job: Job) -> dict | None:
    return job.objective.state_dict() if job.objective.stateful else None


def streamed_epochs_agree(job: Job) -> bool:
    """Epoch events go to the callbacks unless the data is streamed on several processes: there each
    process's pass ends at its own step, and a callback acting on one (should_save, ...) would
    leave the others waiting in a collective."""
    return not (isinstance(job.train_loader, StreamLoader) and job.accelerator.num_processes > 1)


def epoch_of(job: Job, state: TrainState) -> float:
    """Epochs done, as a fraction; streamed data (its length unknown): the passes finished."""
    if job.steps_per_epoch is None:
        return float(state.epoch)
    return round(state.step / job.steps_per_epoch, 4)


def _windows(job: Job, state: TrainState) -> Iterator[tuple[list, bool, bool]]:
    """Yield ``(micro-batches of one optimizer step, an epoch begins with it, an epoch ends in it)``;
    keeps ``state``'s data position (epoch, micro-batches of it consumed)."""
    if isinstance(job.train_loader, StreamLoader):
        yield from _stream_windows(job, state)
        return
    accum = job.config.train.gradient_accumulation_steps
    while True:
        job.train_loader.set_epoch(state.epoch)
        loader = job.train_loader
        if state.batch_in_epoch:
            loader = job.accelerator.skip_first_batches(loader, state.batch_in_epoch)
        window: list = []
        for batch in loader:
            window.append(batch)
            if len(window) == accum:
                begins = state.batch_in_epoch == 0
                state.batch_in_epoch += len(window)
                # counted per epoch: with token budgets epochs differ in length
                yield window, begins, state.batch_in_epoch >= len(job.train_loader)
                window = []
        if window:
            begins = state.batch_in_epoch == 0
            state.batch_in_epoch += len(window)
            yield window, begins, True
        state.epoch += 1
        state.batch_in_epoch = 0


def _stream_windows(job: Job, state: TrainState) -> Iterator[tuple[list, bool, bool]]:
    """Streamed data (prefopt.data.stream): every window has gradient_accumulation_steps
    micro-batches, running on from one pass into the next, so every process takes part in every
    step whatever the size of its share."""
    accum = job.config.train.gradient_accumulation_steps
    window, ends, begins = [], False, state.batch_in_epoch == 0
    for batch, last_of_pass in job.train_loader.from_position(state.epoch, state.batch_in_epoch):
        window.append(batch)
        state.batch_in_epoch += 1
        if last_of_pass:
            state.epoch, state.batch_in_epoch, ends = state.epoch + 1, 0, True
        if len(window) == accum:
            yield window, begins, ends
            # a pass that began inside this window is announced with the next one, after its end
            window, begins, ends = [], ends, False


def optimizer_step(job: Job, window: list, metrics: MetricAccumulator) -> tuple[int, str]:
    """Forward/backward every micro-batch of the window, then one optimizer step. Returns the
    tokens read and the step's outcome: "updated"; "skipped" (a non-finite loss on any process,
    or a non-finite gradient norm: no update, a stateful loss's state restored, the window's
    metrics left out; the schedule still advances: a step is a step); "overflow" (fp16: the
    gradient scaler skipped the update and lowered its scale, its normal start-up, not a fault)."""
    acc, model, objective = job.accelerator, job.model, job.objective
    per_batch = [objective.units(b) for b in window]
    names = list(per_batch[0])
    totals = [sum(u[n] for u in per_batch) for n in names]
    if acc.num_processes > 1:
        totals = acc.reduce(torch.tensor(totals, device=acc.device, dtype=torch.float64), reduction="sum").tolist()
    units = dict(zip(names, totals))
    model.train()
    snapshot = copy.deepcopy(objective.state_dict()) if objective.stateful else None
    tokens, finite, window_metrics = 0, True, MetricAccumulator()
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        with contextlib.nullcontext() if last else acc.no_sync(model):
            out = objective.forward(model, batch, units)
            finite = _finite_everywhere(acc, out.loss) and finite
            # Backward even when not finite: every process must take part in the gradient
            # all-reduce; the update is skipped below. DDP averages gradients over processes;
            # the units are already global totals.
            if acc.distributed_type == DistributedType.DEEPSPEED:
                deepspeed_backward(acc, out.loss * acc.num_processes, last)
            else:
                acc.backward(out.loss * acc.num_processes)
        window_metrics.add_all(objective.metrics(out, batch))
        real = batch.num_tokens
        window_metrics.add("batch_fill", real, batch.input_ids.numel())  # real tokens / row slots
        tokens += real
    max_norm = job.config.train.max_grad_norm
    grad_norm = acc.clip_grad_norm_(model.parameters(), max_norm if max_norm else math.inf)
    if grad_norm is not None:
        window_metrics.add("grad_norm", float(grad_norm), 1)
    grads_finite = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)).all())
    if acc.distributed_type == DistributedType.DEEPSPEED:
        # the engine stepped inside the last backward (its fp16 scaler skips overflows itself)
        outcome = "updated"
        if not finite:
            log.warning("non-finite loss under DeepSpeed: the update was DeepSpeed's to skip, not prefopt's")
    elif acc.scaler is not None:
        # fp16: the gradient scaler decides, and must see every step to adjust its scale. It checks the
        # gradient only: a non-finite loss with a finite gradient would be applied, so that step is not
        # taken; the loss scale stays (the loss is computed unscaled) and the step clip_grad_norm_ unscaled
        # is closed.
        if finite:
            job.optimizer.step()
        else:
            acc.scaler.update(acc.scaler.get_scale())
        outcome = "skipped" if not finite else "overflow" if job.optimizer.step_was_skipped else "updated"
    elif finite and grads_finite:
        job.optimizer.step()
        outcome = "updated"
    else:
        outcome = "skipped"
    if outcome == "updated":
        metrics.merge(window_metrics)
    elif snapshot is not None:
        objective.load_state_dict(snapshot)  # a skipped batch leaves no trace in a running statistic
    job.scheduler.step()
    job.optimizer.zero_grad(set_to_none=True)
    return tokens, outcome


def _finite_everywhere(acc, loss: torch.Tensor) -> bool:
    """True when the loss is finite on every process (all raise together, none hangs)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction="sum")
    return not bool(bad.item())


@torch.no_grad()
def evaluate(accelerator, model, objective: Objective, loader) -> dict[str, float]:
    """Objective metrics over ``loader`` (no gradient); the reference is the objective's own.

    Every process runs the same number of batches (forward passes may be collectives);
    padding batches that even them out are scored but not counted."""
    was_training = model.training
    model.eval()
    metrics = MetricAccumulator()
    for batch in console.progress(loader, "evaluating", unit="batch"):
        batch = batch.to(accelerator.device)
        out = objective.forward(model, batch, objective.units(batch), training=False)
        values = objective.metrics(out, batch)
        # A padding batch adds its metric names with zero weight: every process must hold the
        # same names for the single all-reduce of sums and counts.
        metrics.add_all({k: (0.0, 0.0) for k in values} if batch.is_padding else values)
    model.train(was_training)
    return objective.summarize(metrics.means(accelerator))


def _log_eval(job: Job, writer: MetricsWriter, step: int) -> dict:
    """Evaluate, write the eval row, and say so on the console (start, and the headline after)."""
    show = job.accelerator.is_main_process and job.config.train.progress_bar
    started = time.perf_counter()
    if show:
        log.info("evaluating at step %d (%d batches per process)...", step, len(job.eval_loader))
    values = prefixed("eval/", evaluate(job.accelerator, job.model, job.objective, job.eval_loader))
    writer.write(step, values)
    job.events.log(job, step, values)
    job.events.evaluated(job, step, values)
    if show:
        console.show_eval(step, values, time.perf_counter() - started)
    return values


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
