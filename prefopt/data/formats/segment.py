"""Multi-turn segments (SDPO: Kong et al. 2025, Segment-Level Direct Preference Optimization
for Social Agents, arXiv:2501.01821).

A shared dialogue history, then two competing *segments*: each one or more assistant turns,
interleaved with the other party's (user, tool) turns::

    {"history":  [{"role": "user", "content": ...}],
     "chosen":   [{"role": "assistant", ...}, {"role": "user", ...}, {"role": "assistant", ...}],
     "rejected": [{"role": "assistant", ...}, {"role": "user", ...}, {"role": "assistant", ...}]}

ShareGPT turns (``{"from": "human"|"gpt"|..., "value"}``) are accepted as well as
``{role, content}`` messages. The history is the prompt (rendered once, with the chat
template's generation prompt); each segment is a completion of which only the assistant
turns are scored (their content and the end-of-turn token the template writes after it):
the other party's turns and the template's role headers are context, never scored
(``segment=True`` on the example; the masks are made in prefopt.data.tokenize).

* ``segment`` (detected: a ``history`` message list beside ``chosen`` and ``rejected``
  message lists): every assistant turn of a segment is scored.
* ``segment_turn`` (per-turn mode, selected with ``data.format: segment_turn``): a preference
  on the one turn where the two dialogues diverge, the first assistant turn of each segment;
  the turns after it are dropped (under causal attention they cannot change its log-probs).

With ``data.format`` set to either, a record may also give two whole dialogues without a
``history``: ``{"chosen": [whole dialogue], "rejected": [whole dialogue]}``; the history is
then their shared leading messages, cut back to just before the first assistant turn that
differs (the diverging turn).

Rules: the history must not be empty and must end with a user (or tool) turn, every segment
must start with an assistant turn, and the other party's turns trailing a segment's last
assistant turn are dropped (nothing after them is scored). Roles need not alternate.
"""
from __future__ import annotations

from prefopt.data.formats import Format, register_format, require
from prefopt.data.formats.sharegpt import to_message
from prefopt.data.schema import RecordProblem


def messages(value, what: str) -> list[dict]:
    if not isinstance(value, list):
        raise RecordProblem("wrong_type", f"{what} must be a list of messages, got {type(value).__name__}")
    if not value:
        raise RecordProblem("empty", f"{what} is an empty message list")
    return [to_message(m, f"{what}[{i}]") if isinstance(m, dict) else _not_a_message(m, f"{what}[{i}]")
            for i, m in enumerate(value)]


def _not_a_message(value, where: str):
    raise RecordProblem("wrong_type", f"{where} is not a {{role, content}} message: {value!r:.80}")


def split_dialogues(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    """(history, chosen segment, rejected segment) of two whole dialogues: the shared leading
    messages, cut back so that both segments start at an assistant turn."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and chosen[shared - 1]["role"] == "assistant":
        shared -= 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def check_segment(segment: list[dict], name: str) -> list[dict]:
    """The segment without the other party's turns after its last assistant turn."""
    if not any(m["role"] == "assistant" for m in segment):
        raise RecordProblem("no_assistant_turn", f"the {name} segment has no assistant turn: nothing in it "
                                                 f"would be scored (roles: "
                                                 f"{', '.join(m['role'] for m in segment)})")
    if segment[0]["role"] != "assistant":
        raise RecordProblem("wrong_type", f"the {name} segment must start with an assistant turn (the turn "
                                          f"the two dialogues diverge at), got role {segment[0]['role']!r}; "
                                          f"move the turns before it into the history")
    last = max(i for i, m in enumerate(segment) if m["role"] == "assistant")
    return segment[:last + 1]


def first_turn(segment: list[dict]) -> list[dict]:
    return segment[:1]


def converter(per_turn: bool):
    def convert(record: dict) -> dict:
        if record.get("history") is None:  # two whole dialogues (data.format set)
            chosen = messages(require(record, "chosen"), "chosen")
            rejected = messages(require(record, "rejected"), "rejected")
            history, chosen, rejected = split_dialogues(chosen, rejected)
            if not history:
                raise RecordProblem("empty", "the chosen and rejected dialogues share no history before the "
                                             "assistant turn where they diverge")
        else:
            history = messages(require(record, "history"), "history")
            chosen = messages(require(record, "chosen"), "chosen")
            rejected = messages(require(record, "rejected"), "rejected")
        if history[-1]["role"] == "assistant":
            raise RecordProblem("wrong_type", "the history ends with an assistant turn; a segment starts at "
                                              "an assistant turn, so the history must end with the other "
                                              "party's (user or tool) turn")
        chosen, rejected = check_segment(chosen, "chosen"), check_segment(rejected, "rejected")
        if per_turn:
            chosen, rejected = first_turn(chosen), first_turn(rejected)
            if chosen == rejected:
                raise RecordProblem("identical", "the diverging (first) assistant turns of chosen and rejected "
                                                 "are identical; in per-turn mode (segment_turn) only that turn "
                                                 "is compared")
        # per-turn: one assistant turn each, so plain conversational scoring is the same thing
        return {"prompt": history, "chosen": chosen, "rejected": rejected, "segment": not per_turn}
    return convert


register_format(Format(
    name="segment", kind="paired",
    detect=lambda r: (isinstance(r.get("history"), list) and isinstance(r.get("chosen"), list)
                      and isinstance(r.get("rejected"), list)),
    convert=converter(per_turn=False),
    description="SDPO multi-turn segments after a shared history; every assistant turn of a segment "
                "scored, the other party's turns masked (ShareGPT from/value turns accepted)",
    example='{"history": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}, {"role": "user", ...}, '
            '{"role": "assistant", ...}], "rejected": [...]}'))

register_format(Format(
    name="segment_turn", kind="paired",
    detect=lambda r: False,  # the same records as `segment`: chosen with data.format
    convert=converter(per_turn=True),
    description="per-turn mode of segment records (data.format: segment_turn): only the first, diverging "
                "assistant turn of each segment is compared; later turns dropped",
    example='{"history": [...], "chosen": [{"role": "assistant", ...}, ...], "rejected": [...]} (set data.format)'))
