"""Plain text pairs with an implicit prompt (TRL's "standard, implicit prompt" preference layout):
``{"chosen": str, "rejected": str}``, two whole texts that start with the same prompt.

The prompt is their common start, cut back to the last whitespace in it: the completions then
start at a whole word (with the whitespace before it, as a tokenizer joins a word to its space),
so two answers that begin "blue" and "black" do not share "bl" as prompt. Two answers that begin
with the same whole words still share them: when the dialogue is marked (HH's "\\n\\nAssistant:")
the ``hh`` format splits at the marker instead, and an explicit ``prompt`` column is exact.
"""
from __future__ import annotations

import os
import re

from prefopt.data.formats import Format, register_format, require_str
from prefopt.data.schema import RecordProblem

_LAST_WORD = re.compile(r"\S*$")


def convert(record: dict) -> dict:
    chosen, rejected = require_str(record, "chosen"), require_str(record, "rejected")
    common = os.path.commonprefix([chosen, rejected])
    # a word the common start ends in may go on differently in the two texts: it is not prompt
    prompt = _LAST_WORD.sub("", common).rstrip()
    if not prompt.strip():
        raise RecordProblem("mismatch", "chosen and rejected share no prompt (they differ within "
                                        "their first word)")
    end = len(prompt)
    return {"prompt": prompt, "chosen": chosen[end:], "rejected": rejected[end:]}


register_format(Format(
    name="plain_implicit", kind="paired",
    detect=lambda r: "prompt" not in r and isinstance(r.get("chosen"), str) and isinstance(r.get("rejected"), str),
    convert=convert,
    description="two whole texts; the prompt is their common start, up to its last whitespace",
    example='{"chosen": "Q: ... A: good", "rejected": "Q: ... A: bad"}'))
