"""No reference: reference-free objectives (SFT, SimPO, ORPO, reference-free DPO, ...)."""
from __future__ import annotations

from prefopt.data.collate import Batch


class NoReference:
    name = "none"
    description = "none"

    def prepare(self, ctx) -> None:
        pass

    def scores(self, batch: Batch, keep_token_logprobs: bool = False):
        return None
