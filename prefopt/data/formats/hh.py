"""Anthropic HH-RLHF records: two full dialogues with an implicit shared prompt.

``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}``

The prompt is everything up to and including the **last** "\\n\\nAssistant:" of the
chosen dialogue, and the rejected dialogue must start with the same prompt. Splitting at
the character-level common prefix instead (a common mistake) would swallow a first word
that both answers happen to share into the prompt.

Two quirks of the real data are read, not refused:

* an empty reply ("...\\n\\nAssistant: " and nothing after it: 4 of the 2,312 harmless-base
  test pairs, all chosen) means the assistant said nothing; it is a completion of EOS alone;
* when the two dialogues differ before their own last "\\n\\nAssistant:" (5 of those pairs:
  a reply that itself holds an "Assistant:" turn), the prompt is the shared dialogue up to the
  last "\\n\\nAssistant:" in it, and each reply runs to the end of its dialogue.
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


def shared_prompt(chosen: str, rejected: str) -> str:
    """The two dialogues' common start, cut back to end just after its last "\\n\\nAssistant:"."""
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(MARKER, 0, common)  # a marker that ends within the shared part
    if cut < 0:
        raise RecordProblem("mismatch", "chosen and rejected dialogues share no '\\n\\nAssistant:' turn "
                                        "(no shared prompt)")
    return chosen[:cut + len(MARKER)]


def convert(record: dict) -> dict:
    chosen, rejected = require_str(record, "chosen"), require_str(record, "rejected")
    prompt, chosen_reply = split_dialogue(chosen, "chosen")
    rejected_prompt, rejected_reply = split_dialogue(rejected, "rejected")
    if rejected_prompt != prompt:
        prompt = shared_prompt(chosen, rejected)
        chosen_reply, rejected_reply = chosen[len(prompt):], rejected[len(prompt):]
    return {"prompt": prompt, "chosen": chosen_reply, "rejected": rejected_reply}


register_format(Format(
    name="hh", kind="paired",
    detect=lambda r: ("prompt" not in r and isinstance(r.get("chosen"), str)
                      and isinstance(r.get("rejected"), str) and MARKER in r["chosen"]),
    convert=convert,
    description="HH-RLHF full dialogues; prompt = up to the last '\\n\\nAssistant:'",
    example='{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}',
    empty_ok=("chosen", "rejected")))
