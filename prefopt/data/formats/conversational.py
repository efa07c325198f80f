"""Conversational records: message lists, rendered with the tokenizer's chat template.

Explicit prompt (TRL's conversational preference format)::

    {"prompt": [{"role": "user", "content": ...}],
     "chosen": [{"role": "assistant", "content": ...}], "rejected": [...]}

Implicit prompt: ``chosen`` and ``rejected`` are whole conversations; the prompt is
their common leading messages, which must end just before the final assistant turn(s).
"""
from __future__ import annotations

from prefopt.data.formats import Format, register_format, require
from prefopt.data.schema import RecordProblem


def as_messages(value, what: str):
    if isinstance(value, dict):  # a single message
        return [value]
    return value


def convert_explicit(record: dict) -> dict:
    return {"prompt": require(record, "prompt"),
            "chosen": as_messages(require(record, "chosen"), "chosen"),
            "rejected": as_messages(require(record, "rejected"), "rejected")}


def convert_implicit(record: dict) -> dict:
    chosen, rejected = require(record, "chosen"), require(record, "rejected")
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise RecordProblem("wrong_type", "chosen and rejected must both be message lists")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # The prompt ends at the last non-assistant message of the shared part.
    while shared > 0 and isinstance(chosen[shared - 1], dict) and chosen[shared - 1].get("role") == "assistant":
        shared -= 1
    if shared == 0:
        raise RecordProblem("mismatch", "chosen and rejected conversations share no prompt messages")
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


register_format(Format(
    name="conversational", kind="paired",
    detect=lambda r: isinstance(r.get("prompt"), list) and "chosen" in r and "rejected" in r,
    convert=convert_explicit,
    description="message lists: prompt, chosen and rejected (chat template applied)",
    example='{"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}'))

register_format(Format(
    name="conversational_implicit", kind="paired",
    detect=lambda r: "prompt" not in r and isinstance(r.get("chosen"), list) and isinstance(r.get("rejected"), list),
    convert=convert_implicit,
    description="two whole conversations; the prompt is their shared leading messages",
    example='{"chosen": [{"role": "user", ...}, {"role": "assistant", ...}], "rejected": [...]}'))
