"""The canonical example schema every source format is converted to.

Three shapes, one per kind of data:

* ``PreferenceExample(prompt, chosen, rejected)`` — paired data (DPO and family);
* ``CompletionExample(prompt, completion, label)`` — unpaired data (KTO: ``label`` True for
  desirable, False for undesirable) and SFT data (``label`` None);
* ``PromptExample(prompt)`` — prompts alone, what generation samples from (any of the
  shapes above gives its prompt too);
* ``RankedExample(prompt, responses, ranking)`` — K ≥ 2 responses to one prompt, best first,
  with their scores (listwise losses: Plackett–Luce, InfoNCA, LiPO, ...).

A prompt is either raw text (``str``) or a conversation (a list of ``{"role", "content"}``
messages, rendered by the tokenizer's chat template). A completion has the same form as
its prompt: text, or a list of assistant messages. Every example remembers where it came
from (``Origin``: file and line) so that any later error can point at the record.

``segment`` marks conversational completions that are multi-turn *segments* (SDPO, Kong et
al. 2025, arXiv:2501.01821): assistant turns interleaved with the other party's turns, of
which only the assistant turns are scored (prefopt.data.formats.segment; the masks are made
by prefopt.data.tokenize). Without it, every completion token is scored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Union

Message = dict  # {"role": "system" | "user" | "assistant" | "tool", "content": str}
Text = Union[str, list]  # raw text or a list of messages

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Origin:
    """Where a record came from: a file and the line it starts on, or a record index."""
    source: str
    index: int               # 0-based record index within the source
    line: int | None = None  # 1-based line in a text file, when known

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.source}:{self.line}"
        return f"{self.source} record {self.index + 1}"


class RecordProblem(Exception):
    """A problem with one record. ``reason`` is a short category used in the counts."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


@dataclass
class PreferenceExample:
    prompt: Text
    chosen: Text
    rejected: Text
    origin: Origin
    extras: dict[str, Any] = field(default_factory=dict)
    segment: bool = False    # multi-turn segments: only their assistant turns are scored

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class CompletionExample:
    prompt: Text
    completion: Text
    origin: Origin
    label: bool | None = None  # True desirable, False undesirable, None: plain SFT target
    extras: dict[str, Any] = field(default_factory=dict)
    segment: bool = False      # a multi-turn segment: only its assistant turns are scored

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class PromptExample:
    prompt: Text
    origin: Origin
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass(frozen=True)
class Ranking:
    """The scores of a RankedExample's responses, best first (higher is better). ``explicit``:
    the data gave them (``scores``); otherwise they are labels, 1 for the chosen and 0 for every
    rejected, which order the responses but are no rewards."""
    scores: tuple[float, ...]
    explicit: bool

    def ties(self) -> list[tuple[int, int]]:
        """Neighbouring positions (0-based, best first) whose scores are equal."""
        return [(k, k + 1) for k in range(len(self.scores) - 1) if self.scores[k] == self.scores[k + 1]]


@dataclass
class RankedExample:
    """K ≥ 2 responses to one prompt, sorted best first (stable: equal scores keep their order)."""
    prompt: Text
    responses: list[Text]
    ranking: Ranking
    origin: Origin
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def texts_of(example: PreferenceExample | CompletionExample | PromptExample) -> list[tuple[str, str]]:
    """Every text of an example with the name of its field (``chosen[0].content`` in a conversation)."""
    fields = [(name, getattr(example, name)) for name in ("prompt", "chosen", "rejected", "completion")
              if hasattr(example, name)]
    fields += [(f"responses[{i}]", r) for i, r in enumerate(getattr(example, "responses", ()))]
    fields += [(f"column '{name}'", value) for name, value in example.extras.items() if isinstance(value, str)]
    out = []
    for name, value in fields:
        if isinstance(value, str):
            out.append((name, value))
        else:
            out += [(f"{name}[{i}].content", m["content"]) for i, m in enumerate(value)]
    return out


def check_unicode(text: str, what: str) -> str:
    """``text``, or a RecordProblem when it holds a lone UTF-16 surrogate (what JSON's "\\ud800"
    escape without its pair decodes to): such a string is not valid Unicode, so it cannot be
    encoded to UTF-8 and no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordProblem("invalid_unicode", f"{what} holds a lone UTF-16 surrogate "
                                               f"(U+{ord(text[e.start]):04X} at character {e.start + 1}), "
                                               f"which is not valid Unicode") from None
    return text


def check_text(value: Any, what: str, *, conversational: bool | None = None, empty_ok: bool = False) -> Text:
    """Validate a prompt or completion: non-empty text (``empty_ok``: any text), or well-formed messages."""
    if isinstance(value, str):
        if conversational:
            raise RecordProblem("wrong_type", f"{what} is text but the prompt is a conversation")
        if not value.strip() and not empty_ok:
            raise RecordProblem("empty", f"{what} is empty")
        return check_unicode(value, what)
    if isinstance(value, list):
        if conversational is False:
            raise RecordProblem("wrong_type", f"{what} is a message list but the prompt is text")
        if not value:
            raise RecordProblem("empty", f"{what} is an empty message list")
        for i, msg in enumerate(value):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise RecordProblem("wrong_type", f"{what}[{i}] is not a {{role, content}} message: {msg!r:.80}")
            if msg["role"] not in ROLES:
                raise RecordProblem("wrong_type", f"{what}[{i}] has unknown role {msg['role']!r}; "
                                                  f"expected one of {', '.join(ROLES)}")
            if not isinstance(msg["content"], str):
                raise RecordProblem("wrong_type", f"{what}[{i}].content must be a string, got "
                                                  f"{type(msg['content']).__name__}")
            if msg["role"] != "system" and not msg["content"].strip():
                raise RecordProblem("empty", f"{what}[{i}] ({msg['role']}) has empty content")
            check_unicode(msg["content"], f"{what}[{i}].content")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if value is None:
        raise RecordProblem("missing_field", f"{what} is missing (null)")
    raise RecordProblem("wrong_type", f"{what} must be text or a list of messages, got "
                                      f"{type(value).__name__}")


def validate_pair(prompt: Any, chosen: Any, rejected: Any, empty_ok: tuple[str, ...] = ()) -> tuple[Text, Text, Text]:
    """``empty_ok``: the fields that may be empty text (HH's empty replies: the assistant said nothing)."""
    prompt = check_text(prompt, "prompt")
    conv = isinstance(prompt, list)
    chosen = check_text(chosen, "chosen", conversational=conv, empty_ok="chosen" in empty_ok)
    rejected = check_text(rejected, "rejected", conversational=conv, empty_ok="rejected" in empty_ok)
    if conv:
        _check_prompt_turns(prompt)
        for name, comp in (("chosen", chosen), ("rejected", rejected)):
            if comp[0]["role"] != "assistant":
                raise RecordProblem("wrong_type", f"{name} must start with an assistant message, "
                                                  f"got role {comp[0]['role']!r}")
    if chosen == rejected:
        raise RecordProblem("identical", "chosen and rejected are identical")
    return prompt, chosen, rejected


def validate_ranked(prompt: Any, responses: Any, scores: Any, names: list[str] | None = None,
                    explicit: bool = True) -> tuple[Text, list[Text], Ranking]:
    """A prompt and K ≥ 2 responses with one finite score each, sorted best first. ``names``: how
    messages call the responses (``chosen``, ``rejected[0]``; default ``responses[i]``)."""
    if not isinstance(responses, list):
        raise RecordProblem("wrong_type", f"responses must be a list, got {type(responses).__name__}")
    if len(responses) < 2:
        raise RecordProblem("too_few_responses", f"a listwise record needs at least 2 responses, got "
                                                 f"{len(responses)}")
    if not isinstance(scores, list) or len(scores) != len(responses):
        got = f"{len(scores)} scores" if isinstance(scores, list) else f"a {type(scores).__name__}"
        raise RecordProblem("scores_mismatch", f"scores must be a list with one number per response: "
                                               f"{len(responses)} responses, {got}")
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise RecordProblem("wrong_type", f"scores[{i}] must be a number, got {score!r:.40}")
        if not math.isfinite(score):
            raise RecordProblem("invalid_score", f"scores[{i}] is {score} (scores must be finite numbers)")
    names = names or [f"responses[{i}]" for i in range(len(responses))]
    prompt = check_text(prompt, "prompt")
    conv = isinstance(prompt, list)
    responses = [check_text(r, name, conversational=conv) for r, name in zip(responses, names)]
    if conv:
        _check_prompt_turns(prompt)
        for name, r in zip(names, responses):
            if r[0]["role"] != "assistant":
                raise RecordProblem("wrong_type", f"{name} must start with an assistant message, got role "
                                                  f"{r[0]['role']!r}")
    for j in range(len(responses)):
        for i in range(j):
            if responses[i] == responses[j]:
                raise RecordProblem("identical", f"{names[i]} and {names[j]} are identical")
    order = sorted(range(len(responses)), key=lambda i: -float(scores[i]))  # stable: ties keep their order
    return (prompt, [responses[i] for i in order],
            Ranking(tuple(float(scores[i]) for i in order), explicit))


def validate_completion(prompt: Any, completion: Any, empty_ok: tuple[str, ...] = ()) -> tuple[Text, Text]:
    """``empty_ok``: the fields that may be empty text (the text format's prompt)."""
    prompt = check_text(prompt, "prompt", empty_ok="prompt" in empty_ok)
    conv = isinstance(prompt, list)
    completion = check_text(completion, "completion", conversational=conv)
    if conv:
        _check_prompt_turns(prompt)
        if completion[0]["role"] != "assistant":
            raise RecordProblem("wrong_type", "completion must start with an assistant message")
    return prompt, completion


def validate_prompt(prompt: Any) -> Text:
    prompt = check_text(prompt, "prompt")
    if isinstance(prompt, list):
        _check_prompt_turns(prompt)
    return prompt


def _check_prompt_turns(prompt: list) -> None:
    if prompt[-1]["role"] == "assistant":
        raise RecordProblem("wrong_type", "the prompt conversation ends with an assistant turn; the "
                                          "completion must follow a user (or tool) turn")
    if all(m["role"] == "system" for m in prompt):
        raise RecordProblem("empty", "the prompt has only system messages")
