"""Plain text for language modelling (TRL's SFT ``text`` layout): ``{"text": str}``.

The prompt is empty and the whole text is the completion, so every token is learned (the
first one too when the tokenizer adds a BOS; otherwise the first token conditions the rest:
prefopt.data.tokenize). SFT only: a preference or unpaired loss has nothing to compare.
"""
from __future__ import annotations

from prefopt.data.formats import Format, register_format, require_str

OTHER_KEYS = ("prompt", "chosen", "rejected", "completion", "messages", "conversations")

register_format(Format(
    name="text", kind="completion",
    detect=lambda r: isinstance(r.get("text"), str) and not any(k in r for k in OTHER_KEYS),
    convert=lambda r: {"prompt": "", "completion": require_str(r, "text")},
    description="SFT / language modelling: the whole text is learned (no prompt)",
    example='{"text": "..."}',
    empty_ok=("prompt",)))
