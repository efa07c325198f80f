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
        # requests for the current step boundary; the loop clears save, evaluate and log_now once acted on
        self.stop = self.save = self.evaluate = self.log_now = False

    def train_begin(self, job: Any, state: Any) -> None: ...

    def epoch_begin(self, job: Any, state: Any) -> None: ...

    def step_begin(self, job: Any, state: Any) -> None: ...

    def step_end(self, job: Any, state: Any) -> None: ...

    def epoch_end(self, job: Any, state: Any) -> None: ...

    def log(self, job: Any, step: int, values: dict) -> None:
        """A metrics row (training means, or eval values with the ``eval/`` prefix)."""

    def evaluated(self, job: Any, step: int, values: dict) -> None: ...

    def saved(self, job: Any, step: int, path: Any) -> None: ...

    def train_end(self, job: Any, state: Any) -> None: ...
