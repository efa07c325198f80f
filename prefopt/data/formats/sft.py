"""Supervised (SFT) records: a prompt and the completion to imitate.

``{"prompt": str | messages, "completion": str | messages}``, or a conversation
``{"messages": [...]}`` / ShareGPT ``{"conversations": [...]}`` whose last assistant turn
is the completion. Paired and unpaired records also work for SFT (their chosen, or
desirable, completions are used); see prefopt.data.pipeline.
"""
from __future__ import annotations

from prefopt.data.formats import Format, register_format, require
from prefopt.data.formats.unpaired import split_last_assistant


def convert_prompt_completion(record: dict) -> dict:
    completion = require(record, "completion")
    if isinstance(completion, dict):
        completion = [completion]
    return {"prompt": require(record, "prompt"), "completion": completion}


def convert_messages(record: dict) -> dict:
    key = "messages" if "messages" in record else "conversations"
    prompt, completion = split_last_assistant(require(record, key), key)
    return {"prompt": prompt, "completion": completion}


register_format(Format(
    name="prompt_completion", kind="completion",
    detect=lambda r: "prompt" in r and "completion" in r,
    convert=convert_prompt_completion,
    description="SFT: a prompt and the completion to imitate",
    example='{"prompt": ..., "completion": ...}'))

register_format(Format(
    name="messages", kind="completion",
    detect=lambda r: "messages" in r or "conversations" in r,
    convert=convert_messages,
    description="SFT: a conversation; its last assistant turn is the completion",
    example='{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}'))
