"""K responses to one prompt (listwise data), text or conversational:

* ``ranked``: ``{"prompt", "responses": [...], "scores": [...]}``, one score per response,
  higher is better (a reward model's or annotators' ratings);
* ``multi_rejected``: ``{"prompt", "chosen", "rejected": [...]}``, one chosen and a list of
  rejected responses (no scores: the chosen ranks first, the rejected tie behind it).

A response is text, or a list of assistant messages (a single message is taken as a list of
one) when the prompt is a conversation. Both become a ``RankedExample`` with its responses
sorted best first. Detected before the pair formats: a ``rejected`` that is a list of texts or of
message lists is several rejected responses, while a list of messages is one conversational
rejected (the ``conversational`` format).
"""
from __future__ import annotations

from prefopt.data.formats import Format, register_format, require
from prefopt.data.schema import RecordProblem


def as_messages(value, what: str):
    """A single message is a list of one (not imported from .conversational: importing it
    would register the pair formats first, ahead of these in detection)."""
    return [value] if isinstance(value, dict) else value


def _responses(value, key: str) -> list:
    if not isinstance(value, list):
        raise RecordProblem("wrong_type", f"field '{key}' must be a list of responses, got {type(value).__name__}")
    return [as_messages(r, key) for r in value]


def convert_ranked(record: dict) -> dict:
    return {"prompt": require(record, "prompt"), "responses": _responses(require(record, "responses"), "responses"),
            "scores": require(record, "scores"), "explicit": True}


def convert_multi_rejected(record: dict) -> dict:
    rejected = _responses(require(record, "rejected"), "rejected")
    responses = [as_messages(require(record, "chosen"), "chosen")] + rejected
    return {"prompt": require(record, "prompt"), "responses": responses,
            "scores": [1.0] + [0.0] * len(rejected), "explicit": False,
            "names": ["chosen"] + [f"rejected[{i}]" for i in range(len(rejected))]}


def _several_rejected(record: dict) -> bool:
    rejected = record.get("rejected")
    return (isinstance(rejected, list) and "prompt" in record and "chosen" in record
            and all(isinstance(r, (str, list)) for r in rejected))


register_format(Format(
    name="ranked", kind="listwise",
    detect=lambda r: "prompt" in r and "responses" in r,
    convert=convert_ranked,
    description="K responses with one score each (higher is better), for listwise losses",
    example='{"prompt": "...", "responses": ["...", "...", "..."], "scores": [7.5, 3.0, 5.0]}'))

register_format(Format(
    name="multi_rejected", kind="listwise",
    detect=_several_rejected,
    convert=convert_multi_rejected,
    description="one chosen and several rejected responses, for listwise losses",
    example='{"prompt": "...", "chosen": "...", "rejected": ["...", "..."]}'))
