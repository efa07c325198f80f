"""What a person sees while a run goes: progress of the slow phases, the eval table, the end summary.

    with phase("tokenising train", total=len(examples), unit="example") as tick:
        for ex in examples: ...; tick()
    for batch in progress(loader, "evaluating", unit="batch"): ...

On a terminal (stderr is a tty) a phase is a tqdm bar that appears once the phase has run
QUIET seconds; in a log (CI, nohup, pytest) it is a plain line at most every EVERY seconds and a
final line with the count and the seconds. A phase that ends within QUIET seconds prints nothing
either way, so short runs and tests stay quiet. Only the main process prints, and nothing
progress-like with ``train.progress_bar: false`` (``configure``, called by the trainer's setup).
Phases without ticks (a checkpoint being written) print a line every EVERY seconds from a
helper thread, and the final line.

Results (the eval table, the end-of-run summary) are printed whatever train.progress_bar says:
a rich table on a terminal, aligned plain lines in a log.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from prefopt.train.metrics import last_rows

log = logging.getLogger("prefopt")

QUIET = 5.0    # seconds: a phase that ends sooner prints nothing
EVERY = 10.0   # seconds between two progress lines of a phase in a log
clock = time.monotonic  # the clock of phases (tests replace it)

_settings = {"progress": True, "main": None}  # main: None until configure(); then the accelerator's word

# The metrics of the eval table, in this order, those present (preference losses, then SFT's).
EVAL_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                "logps/chosen", "logps/rejected", "mean_token_accuracy", "kl")
# Shorter headings for the terminal's table, so that it fits 80 columns (the log keeps the full names).
SHORT = {"rewards/accuracies": "reward acc", "rewards/margins": "margin", "rewards/chosen": "chosen",
         "rewards/rejected": "rejected", "logps/chosen": "logp chosen", "logps/rejected": "logp rejected",
         "mean_token_accuracy": "token acc"}


def configure(progress: bool = True, main: bool | None = None) -> None:
    """``progress``: train.progress_bar (False: no phase output); ``main``: this process prints."""
    _settings["progress"] = progress
    _settings["main"] = main


def is_main() -> bool:
    main = _settings["main"]
    return int(os.environ.get("RANK", "0")) == 0 if main is None else main


def shown() -> bool:
    """Progress is printed by this process."""
    return bool(_settings["progress"]) and is_main()


def interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stderr
        return False


def clock_text(seconds: float) -> str:
    """H:MM:SS."""
    seconds = int(max(seconds, 0)) if math.isfinite(seconds) else 0
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Phase:
    """One phase's progress; ``tick(n)`` counts ``n`` more units done."""

    def __init__(self, what: str, total: int | None = None, unit: str = "it", enabled: bool = True):
        self.what, self.total, self.unit = what, total, unit
        self.units = unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")
        self.count = 0
        self.enabled = enabled and shown()
        self.started = self.last_line = clock()
        self.bar = None
        self._stop: threading.Event | None = None
        if not self.enabled:
            return
        if interactive() and total is not None:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=what, unit=unit, delay=QUIET, dynamic_ncols=True, leave=False)
        elif total is None:  # no ticks to hang lines on: a helper thread says it is still going
            self._stop = threading.Event()
            threading.Thread(target=self._heartbeat, daemon=True, name="prefopt-phase").start()

    def tick(self, n: int = 1) -> None:
        self.count += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = clock()
        if now - self.started >= QUIET and now - self.last_line >= EVERY:
            self.last_line = now
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        """The periodic line: ``tokenising train: 1200/5000 examples (24%), 0:00:12, ETA 0:00:38``."""
        elapsed = now - self.started
        if self.total:
            eta = elapsed / max(self.count, 1) * (self.total - self.count) if self.count else math.nan
            return (f"{self.what}: {self.count}/{self.total} {self.units} ({100 * self.count / self.total:.0f}%), "
                    f"{clock_text(elapsed)}" + (f", ETA {clock_text(eta)}" if self.count else ""))
        if self.count:
            return f"{self.what}: {self.count} {self.units}, {clock_text(elapsed)}"
        return f"{self.what}... {clock_text(elapsed)}"

    def _heartbeat(self) -> None:
        while not self._stop.wait(EVERY):
            if not self.count:  # a phase that ticks prints its own lines
                log.info("%s", self.line(clock()))

    def close(self, finished: bool = True) -> None:
        if self._stop is not None:
            self._stop.set()
        if self.bar is not None:
            self.bar.close()
        seconds = clock() - self.started
        if self.enabled and finished and seconds >= QUIET:
            log.info("%s", self.final_line(seconds))

    def final_line(self, seconds: float) -> str:
        """``tokenising train: 5000 examples in 48.2s (104 examples/s)``; ``saving final: done in 12.0s``."""
        if self.total is None and not self.count:
            return f"{self.what}: done in {seconds:.1f}s"
        return f"{self.what}: {self.count} {self.units} in {seconds:.1f}s ({self.count / max(seconds, 1e-9):.3g} " \
               f"{self.units}/s)"


@contextlib.contextmanager
def phase(what: str, total: int | None = None, unit: str = "it", enabled: bool = True) -> Iterator:
    """A phase of the run: yields ``tick(n=1)``. See the module docstring for what it prints."""
    p = Phase(what, total, unit, enabled)
    finished = False
    try:
        yield p.tick
        finished = True
    finally:
        p.close(finished)


def progress(items: Iterable, what: str, total: int | None = None, unit: str = "it",
             enabled: bool = True) -> Iterator:
    """``items``, one tick each (``total``: len(items) when it has one)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with phase(what, total, unit, enabled) as tick:
        for item in items:
            yield item
            tick()


# ----------------------------------------------------------------------------- the step line

def postfix(logged: dict) -> dict:
    """The fields of the training bar (as the plain step line has them): loss, accuracy, grad norm, tokens/s."""
    out = {}
    for key, name in (("loss", "loss"), ("rewards/accuracies", "acc"), ("mean_token_accuracy", "acc"),
                      ("grad_norm", "gnorm")):
        if key in logged and name not in out:
            out[name] = f"{logged[key]:.4g}"
    if "tokens_per_second" in logged:
        out["tok/s"] = f"{logged['tokens_per_second']:.0f}"
    return out


# ----------------------------------------------------------------------------- evaluation

def eval_columns(values: dict) -> list[tuple[str, str]]:
    """(name, value) of the eval table: the key metrics present (``eval/`` prefix dropped)."""
    plain = {k.removeprefix("eval/"): v for k, v in values.items()}
    names = [k for k in EVAL_METRICS if k in plain] or [k for k in plain if isinstance(plain[k], (int, float))][:6]
    if "rewards/accuracies" in names and "mean_token_accuracy" in names:  # a preference loss: its accuracy
        names.remove("mean_token_accuracy")
    return [(k, f"{plain[k]:.4g}") for k in names]


def eval_lines(step: int, values: dict, seconds: float) -> list[str]:
    """Two aligned lines: ``eval at step 4 (1.2s):  loss    rewards/accuracies ...`` and the values under them."""
    columns = eval_columns(values)
    title = f"eval at step {step} ({seconds:.1f}s): "
    widths = [max(len(k), len(v)) for k, v in columns]
    head = "  ".join(k.ljust(w) for (k, _), w in zip(columns, widths))
    row = "  ".join(v.ljust(w) for (_, v), w in zip(columns, widths))
    return [(title + head).rstrip(), (" " * len(title) + row).rstrip()]


def eval_table(step: int, values: dict, seconds: float, file=None) -> None:
    """A rich table of the key metrics (4 lines: title, names, rule, values)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"eval at step {step} ({seconds:.1f}s)", box=box.SIMPLE_HEAD, show_edge=False,
                  title_justify="left", padding=(0, 1))
    columns = eval_columns(values)
    for name, _ in columns:
        table.add_column(SHORT.get(name, name), justify="right", no_wrap=True)
    table.add_row(*[v for _, v in columns])
    Console(file=file or sys.stderr, highlight=False).print(table)


def show_eval(step: int, values: dict, seconds: float) -> None:
    """The eval results, when they happen: a rich table on a terminal, two plain lines in a log."""
    if not is_main():
        return
    if interactive():
        from tqdm import tqdm
        with tqdm.external_write_mode(file=sys.stderr):  # around the training bar, not through it
            eval_table(step, values, seconds)
        return
    for line in eval_lines(step, values, seconds):
        log.info("%s", line)


# ----------------------------------------------------------------------------- the end of a run

def summary(output_dir: Path, step: int, total_steps: int, seconds: float, skipped: int = 0,
            resumed: bool = False) -> str:
    """One line at the end of a run: steps, time, final loss and eval accuracy, where the outputs are."""
    output_dir = Path(output_dir)
    train, evaluation = last_rows(output_dir / "metrics.jsonl")
    steps = f"{step} steps" if step >= total_steps else f"{step} of {total_steps} steps (stopped early)"
    parts = [f"done: {steps}{' (resumed)' if resumed else ''} in {clock_text(seconds)} ({skipped} skipped)"]
    if "loss" in train:
        parts.append(f"final loss {train['loss']:.4g}")
    if "eval/loss" in evaluation:
        parts.append(f"eval loss {evaluation['eval/loss']:.4g}")
    for key, name in (("eval/rewards/accuracies", "eval accuracy"), ("eval/mean_token_accuracy", "eval token accuracy")):
        if key in evaluation:
            parts.append(f"{name} {evaluation[key]:.4g}")
            break
    outputs = []
    if (output_dir / "final").is_dir():
        outputs.append(f"{output_dir / 'final'} (model)")
    for name in ("metrics.jsonl", "report.html", "data_report.json"):
        if (output_dir / name).is_file():
            outputs.append(name if outputs else str(output_dir / name))
    checkpoints = output_dir / "checkpoints"
    kept = [p for p in checkpoints.glob("step-*") if p.is_dir()] if checkpoints.is_dir() else []
    if kept:
        outputs.append(f"checkpoints/ ({len(kept)})")
    return ", ".join(parts) + ("; outputs: " + ", ".join(outputs) if outputs else "")


def show_summary(*args, **kwargs) -> None:
    if is_main():
        log.info("%s", summary(*args, **kwargs))
