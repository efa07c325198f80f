"""Measurement shared by both sides of the benchmark (imported by side_trl.py and side_prefopt.py).

Both sides are timed and measured by the same code, attached to the same two places, so
neither framework's own bookkeeping decides the numbers:

* **first step begins**: the first forward of any module once ``trainer.train()`` has been
  called (a global ``nn.Module`` forward pre-hook, attached right before ``train()`` and
  removed when it fires). In a step the reference may run before the policy (prefopt) or
  after it (TRL): either way the step begins with its first forward. Everything before
  ``train()`` (model and tokenizer loading, tokenisation, a reference precompute, which both
  TRL's ``DPOTrainer.__init__`` and prefopt's ``setup()`` run) and ``train()``'s own start
  (optimizer creation, fetching the first batch) is *setup*.
* **a step ends**: ``torch.optim`` calls a global post-step hook after every optimizer step
  (``register_optimizer_step_post_hook``): the last one ends training. What a trainer does
  after its last step (saving a final model) is not counted.

Memory: at the first step the lifetime peak RSS so far is read and the kernel's peak
counter is reset (``/proc/self/clear_refs`` = 5, Linux >= 4.0), so the peak read after each
optimizer step is the peak *of training*; "training RSS" is that peak minus the RSS right
before the first step. Peak RSS is the larger of the setup peak and the training peak.
"""
from __future__ import annotations

import json
import re
import resource
import sys
import time
from pathlib import Path

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def rss_kb() -> int:
    return _status_kb("VmRSS")


def peak_kb() -> int:
    """Peak RSS since process start or the last reset (VmHWM; ru_maxrss where /proc lacks it)."""
    return _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class TrainWindow:
    """Records the first training step's begin, every optimizer step's end, and RSS around them."""

    def __init__(self):
        self.begin: float | None = None
        self.step_ends: list[float] = []
        self.rss_before_kb = 0
        self.peak_before_kb = 0
        self.train_peak_kb = 0
        self.peak_reset = False
        self._handles: list = []

    def attach(self) -> None:
        """Call right before ``trainer.train()``."""
        self._forward_handle = register_module_forward_pre_hook(self._on_forward)
        self._handles.append(self._forward_handle)
        self._handles.append(register_optimizer_step_post_hook(self._on_step))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_forward(self, module, args):
        if self.begin is None:
            self.peak_before_kb = max(peak_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            self.rss_before_kb = rss_kb()
            self.peak_reset = reset_peak()
            self.begin = time.time()
            self._forward_handle.remove()  # one Python call per module forward is not free

    def _on_step(self, optimizer, args, kwargs):
        if self.begin is not None:
            self.step_ends.append(time.time())
            self.train_peak_kb = max(self.train_peak_kb, peak_kb())

    def summary(self, t0: float) -> dict:
        if self.begin is None or not self.step_ends:
            raise RuntimeError("no training step was observed (no grad-enabled forward or no optimizer step)")
        train_peak = self.train_peak_kb if self.peak_reset else max(self.train_peak_kb, self.peak_before_kb)
        return {
            "setup_s": self.begin - t0,
            "train_s": self.step_ends[-1] - self.begin,
            "steps_observed": len(self.step_ends),
            "step_s": [b - a for a, b in zip([self.begin] + self.step_ends[:-1], self.step_ends)],
            "rss_before_train_mb": self.rss_before_kb / 1024,
            "peak_rss_setup_mb": self.peak_before_kb / 1024,
            "peak_rss_train_mb": train_peak / 1024,
            "peak_rss_mb": max(self.peak_before_kb, train_peak) / 1024,
            "training_rss_mb": (train_peak - self.rss_before_kb) / 1024,
            "peak_reset": self.peak_reset,
        }


def load_settings() -> dict:
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {sys.argv[0]} SETTINGS.json RESULT.json")
    return json.loads(Path(sys.argv[1]).read_text())


def write_result(result: dict) -> None:
    Path(sys.argv[2]).write_text(json.dumps(result, indent=2))


def versions() -> dict:
    import transformers

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "torch_threads": torch.get_num_threads()}
    for name in ("trl", "prefopt", "accelerate", "datasets"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", "?")
    return out
