"""What the training loop reports as it runs, and the requests it takes back.

The loop calls these methods at fixed points; a listener may ask it to stop, save or
evaluate at the next step boundary by setting the flags. The base class listens to
nothing; prefopt.callbacks.Callbacks keeps ``trainer.state`` (a transformers TrainerState with
its ``log_history``) and calls transformers ``TrainerCallback``s, as TRL's trainers do.
"""
from __future__ import annotations

from typing import Any


class Events:
    def __init__(self):
        self.stop = self.save = self.evaluate = False  # requests for the current step boundary

    def train_begin(self, job: Any, state: Any) -> None: ...

    def step_end(self, job: Any, state: Any) -> None: ...

    def log(self, job: Any, step: int, values: dict) -> None:
        """A metrics row (training means, or eval values with the ``eval/`` prefix)."""

    def evaluated(self, job: Any, step: int, values: dict) -> None: ...

    def saved(self, job: Any, step: int, path: Any) -> None: ...

    def train_end(self, job: Any, state: Any) -> None: ...

    def take(self) -> tuple[bool, bool, bool]:
        """The pending (stop, save, evaluate) requests, cleared for the next step."""
        requests = (self.stop, self.save, self.evaluate)
        self.save = self.evaluate = False
        return requests
