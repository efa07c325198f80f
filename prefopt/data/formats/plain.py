"""Plain text records: ``{"prompt": str, "chosen": str, "rejected": str}``.

The prompt and completions are concatenated as they are (no chat template); put any
separator you want the model to see at the end of the prompt.
"""
from __future__ import annotations

from prefopt.data.formats import Format, register_format, require


def convert(record: dict) -> dict:
    return {"prompt": require(record, "prompt"), "chosen": require(record, "chosen"),
            "rejected": require(record, "rejected")}


register_format(Format(
    name="plain", kind="paired",
    detect=lambda r: {"prompt", "chosen", "rejected"} <= set(r),
    convert=convert,
    description="plain strings: prompt, chosen, rejected",
    example='{"prompt": "...", "chosen": "...", "rejected": "..."}'))
