"""ShareGPT-style records (LLaMA-Factory's dpo_en_demo.json).

``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...],
   "chosen": {"from": "gpt", "value": str}, "rejected": {"from": "gpt", "value": str}}``

The conversation (system messages kept) is the prompt; chosen/rejected are one assistant
turn each. ``from/value`` and ``role/content`` keys are both accepted.
"""
from __future__ import annotations

from prefopt.data.formats import Format, register_format, require
from prefopt.data.schema import RecordProblem

ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
           "model": "assistant", "system": "system", "observation": "tool", "tool": "tool",
           "function_call": "assistant"}


def to_message(turn, where: str) -> dict:
    if isinstance(turn, str):
        return {"role": "assistant", "content": turn}
    if not isinstance(turn, dict):
        raise RecordProblem("wrong_type", f"{where} must be a {{from, value}} turn, got {type(turn).__name__}")
    speaker = turn.get("from", turn.get("role"))
    content = turn.get("value", turn.get("content"))
    if not isinstance(speaker, str) or speaker not in ROLE_OF:  # a list or dict: not hashable either
        raise RecordProblem("wrong_type", f"{where} has unknown speaker {speaker!r}; expected one of "
                                          f"{', '.join(ROLE_OF)}")
    if not isinstance(content, str):
        raise RecordProblem("wrong_type" if content is not None else "missing_field",
                            f"{where}.value must be a string")
    return {"role": ROLE_OF[speaker], "content": content}


def conversation(record: dict, key: str = "conversations") -> list[dict]:
    turns = require(record, key)
    if not isinstance(turns, list):
        raise RecordProblem("wrong_type", f"field '{key}' must be a list of turns")
    return [to_message(t, f"{key}[{i}]") for i, t in enumerate(turns)]


def convert(record: dict) -> dict:
    return {"prompt": conversation(record),
            "chosen": [to_message(require(record, "chosen"), "chosen")],
            "rejected": [to_message(require(record, "rejected"), "rejected")]}


register_format(Format(
    name="sharegpt", kind="paired",
    detect=lambda r: "conversations" in r and "chosen" in r and "rejected" in r,
    convert=convert,
    description="ShareGPT conversation with one chosen and one rejected assistant turn",
    example='{"conversations": [{"from": "human", "value": ...}], "chosen": {"from": "gpt", "value": ...}, "rejected": {...}}'))
