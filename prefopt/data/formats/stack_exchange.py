"""stack-exchange-paired records: ``question``, ``response_j`` (better), ``response_k`` (worse).

The prompt is "Question: {question}\\n\\nAnswer: ", as in the StackLLaMA / TRL DPO example.
"""
from __future__ import annotations

from prefopt.data.formats import Format, register_format, require_str

PROMPT = "Question: {question}\n\nAnswer: "


def convert(record: dict) -> dict:
    return {"prompt": PROMPT.format(question=require_str(record, "question")),
            "chosen": require_str(record, "response_j"),
            "rejected": require_str(record, "response_k")}


register_format(Format(
    name="stack_exchange", kind="paired",
    detect=lambda r: {"question", "response_j", "response_k"} <= set(r),
    convert=convert,
    description="stack-exchange-paired: response_j preferred over response_k",
    example='{"question": ..., "response_j": ..., "response_k": ...}'))
