"""Batch layouts: one collator each, all returning the same ``Batch``.

* ``padded``: one sequence per row, right-padded (``PaddedCollator``);
* ``packed``: several sequences per row, no padding between them (``PackedCollator``);
* ``shared``: packed, each prompt once with its completions branching from it.

``make_collator`` builds the one a config names; the equivalence of their log-probs and of
every loss's value and gradient is tested in tests/test_layouts.py.
"""
from prefopt.data.collate.base import Attention, Batch, ScoredSequences
from prefopt.data.collate.packed import PackedCollator
from prefopt.data.collate.padded import PaddedCollator

LAYOUTS = ("padded", "packed", "shared")


def make_collator(layout: str, pad_id: int, roles: tuple[str, ...], *, extras: tuple[str, ...] = (),
                  pad_to_multiple_of: int | None = None, max_tokens_per_row: int | None = None):
    if layout == "padded":
        return PaddedCollator(pad_id, roles, pad_to_multiple_of, extras)
    if layout in ("packed", "shared"):
        return PackedCollator(pad_id, roles, share_prompt=layout == "shared", extras=extras,
                              max_tokens_per_row=max_tokens_per_row, pad_to_multiple_of=pad_to_multiple_of)
    raise ValueError(f"unknown layout '{layout}'; one of {', '.join(LAYOUTS)}")


class Collator:
    """The run's collator: one layout, which setup may still change once the model has been
    checked (prefopt.scoring), after the data loaders that call it exist."""

    def __init__(self, layout: str, pad_id: int, roles: tuple[str, ...], **options):
        self.pad_id, self.roles, self.options = pad_id, roles, options
        self.use(layout)

    def use(self, layout: str) -> None:
        self.layout = layout
        self._collate = make_collator(layout, self.pad_id, self.roles, **self.options)

    def __call__(self, examples):
        return self._collate(examples)


__all__ = ["Collator", "Attention", "Batch", "LAYOUTS", "PackedCollator", "PaddedCollator", "ScoredSequences",
           "make_collator"]
