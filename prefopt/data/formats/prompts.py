"""Prompts alone: what ``prefopt generate`` (and the methods that sample) read.

``{"prompt": str | messages}``. Detected last, so a record of any other format keeps its
own format (generation takes the prompt of any format). Training refuses prompt-only
data with a message that says what it lacks.
"""
from __future__ import annotations

from prefopt.data.formats import Format, register_format, require

register_format(Format(
    name="prompt_only", kind="prompt",
    # not a record of another format with a field missing: that one gets its own message
    detect=lambda r: "prompt" in r and not any(k in r for k in ("chosen", "rejected", "completion", "label")),
    convert=lambda r: {"prompt": require(r, "prompt")},
    description="prompts alone, for generation (sampling, SPIN, iterative DPO)",
    example='{"prompt": "..."} or {"prompt": [{"role": "user", "content": ...}]}'))
