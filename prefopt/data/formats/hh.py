"""Anthropic HH-RLHF records: two full dialogues with an implicit shared prompt.

``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}``

The prompt is everything up to and including the **last** "\\n\\nAssistant:" of the
chosen dialogue, and the rejected dialogue must start with the same prompt. Splitting at
the character-level common prefix instead (a common mistake) would swallow a first word
that both answers happen to share into the prompt.
"""
from __future__ import annotations

from prefopt.data.formats import Format, register_format, require_str
from prefopt.data.schema import RecordProblem

MARKER = "\n\nAssistant:"


def split_dialogue(text: str, what: str) -> tuple[str, str]:
    cut = text.rfind(MARKER)
    if cut < 0:
        raise RecordProblem("wrong_type", f"{what} has no '\\n\\nAssistant:' turn")
    end = cut + len(MARKER)
    return text[:end], text[end:]


def convert(record: dict) -> dict:
    chosen, rejected = require_str(record, "chosen"), require_str(record, "rejected")
    prompt, chosen_reply = split_dialogue(chosen, "chosen")
    rejected_prompt, rejected_reply = split_dialogue(rejected, "rejected")
    if rejected_prompt != prompt:
        raise RecordProblem("mismatch", "chosen and rejected dialogues differ before their last "
                                        "'\\n\\nAssistant:' (no shared prompt)")
    return {"prompt": prompt, "chosen": chosen_reply, "rejected": rejected_reply}


register_format(Format(
    name="hh", kind="paired",
    detect=lambda r: ("prompt" not in r and isinstance(r.get("chosen"), str)
                      and isinstance(r.get("rejected"), str) and MARKER in r["chosen"]),
    convert=convert,
    description="HH-RLHF full dialogues; prompt = up to the last '\\n\\nAssistant:'",
    example='{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}'))
