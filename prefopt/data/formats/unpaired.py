"""Unpaired (KTO-style) records: one completion with a desirable/undesirable label.

``{"prompt": str | messages, "completion": str | messages, "label": bool}`` (TRL's format), or
``{"messages": [...], "label": bool}`` where the last assistant message is the completion
(LLaMA-Factory's kto_en_demo.json; ``kto_tag`` is accepted for ``label``).
"""
from __future__ import annotations

from prefopt.data.formats import Format, register_format, require
from prefopt.data.formats.sharegpt import to_message
from prefopt.data.schema import RecordProblem

LABEL_KEYS = ("label", "kto_tag")


def label_of(record: dict) -> bool:
    key = next((k for k in LABEL_KEYS if k in record), "label")
    value = require(record, key)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")  # CSV cells are text
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise RecordProblem("wrong_type", f"field '{key}' must be a boolean, got {value!r:.40}")


def split_last_assistant(messages, key: str) -> tuple[list, list]:
    if not isinstance(messages, list) or not messages:
        raise RecordProblem("wrong_type", f"field '{key}' must be a non-empty message list")
    messages = [to_message(m, f"{key}[{i}]") for i, m in enumerate(messages)]
    if messages[-1]["role"] != "assistant":
        raise RecordProblem("wrong_type", f"the last message of '{key}' must be the assistant's completion")
    return messages[:-1], messages[-1:]


def convert_prompt_completion(record: dict) -> dict:
    completion = require(record, "completion")
    if isinstance(completion, dict):
        completion = [completion]
    return {"prompt": require(record, "prompt"), "completion": completion, "label": label_of(record)}


def convert_messages(record: dict) -> dict:
    key = "messages" if "messages" in record else "conversations"
    prompt, completion = split_last_assistant(require(record, key), key)
    return {"prompt": prompt, "completion": completion, "label": label_of(record)}


def _has_label(r: dict) -> bool:
    return any(k in r for k in LABEL_KEYS)


register_format(Format(
    name="unpaired", kind="unpaired",
    detect=lambda r: "prompt" in r and "completion" in r and _has_label(r),
    convert=convert_prompt_completion,
    description="one completion with a boolean label (desirable / undesirable)",
    example='{"prompt": ..., "completion": ..., "label": true}'))

register_format(Format(
    name="messages_label", kind="unpaired",
    detect=lambda r: ("messages" in r or "conversations" in r) and _has_label(r),
    convert=convert_messages,
    description="conversation whose last assistant turn is labelled (label or kto_tag)",
    example='{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "label": false}'))
