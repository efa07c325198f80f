"""Property-based fuzzing of the data layer: the reader, every format adapter and the tokeniser.

Random and adversarial records (any unicode including lone surrogates and NUL, wrong types at
every field, deep nesting, messages without roles, records of other formats, long prompts)
and adversarial files (invalid UTF-8 lines, truncated lines, CRLF, a BOM, blank lines) must
give, for every record, either a correct example or a rejection naming its line:

* nothing raises except prefopt's own DataError / ConfigError, and under ``on_error: skip``
  only when nothing survives (DataUnusable) or the data is of another kind than asked for;
* nothing vanishes: every record line is accepted or rejected, exactly once;
* ``raise`` stops at the first record ``skip`` rejects, with the same problem;
* a well-formed record of the detected format is accepted with exactly its fields.

Runs are derandomised (same examples every run) and bounded to keep the file fast on a
2-core CPU; the 1 MB string is one targeted test, not a strategy.
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from prefopt.config import DataConfig
from prefopt.data.formats import FORMATS
from prefopt.data.pipeline import convert, encode, load_examples
from prefopt.data.report import DataReport, DataUnusable
from prefopt.data.schema import Origin, PreferenceExample, RecordProblem
from prefopt.data.tokenize import Encoder
from prefopt.errors import ConfigError, DataError

MAX_LENGTH = 96
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------------- strategies
SAFE = st.text(string.ascii_letters + string.digits, min_size=1, max_size=8)  # always a good text
NASTY = ["", " ", "\n", "\x00", "a\x00b", "\ud800", "x\udfffy", "\ud83d", "\r\n", "\u2028", "\ufeff",
         "\n\nAssistant:", "\n\nHuman: hi\n\nAssistant:", "<|im_end|>", "<|im_start|>user", "é" * 40,
         "word " * 60, "word " * 300]  # the last ones: long, beyond MAX_LENGTH tokens
WILD = st.one_of(
    st.sampled_from(NASTY), st.sampled_from(NASTY),  # twice: drawn as often as the two below together
    st.text(max_size=12),                                                    # any unicode but surrogates
    st.text(st.characters(categories=["Cs", "Cc", "Zl", "Zp", "Ll"]), max_size=6),  # surrogates, controls
)
KEYS = ["prompt", "chosen", "rejected", "completion", "label", "messages", "conversations", "question", "history",
        "response_j", "response_k", "role", "content", "from", "value"]
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), WILD)
ANY = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.sampled_from(KEYS) | WILD, inner, max_size=3)),
                   max_leaves=6)
ROLE = st.sampled_from(["system", "user", "assistant", "tool", "human", "gpt", "narrator"]) | ANY
MESSAGE = st.fixed_dictionaries({}, optional={"role": ROLE, "content": WILD | ANY, "from": ROLE, "value": WILD})


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@dataclass
class Line:
    """One line of a fuzzed file: its bytes and, for a well-formed record, its expected example."""
    data: bytes
    fmt: str | None = None          # the format of a well-formed record
    expected: tuple | None = None   # (prompt, chosen, rejected) it converts to


def well_formed(fmt: str, p: str, c: str, r: str) -> tuple[dict, tuple]:
    """A record of ``fmt`` with safe texts, and the canonical example it must give."""
    if fmt == "plain":
        return {"prompt": p, "chosen": " " + c, "rejected": " " + r}, (p, " " + c, " " + r)
    if fmt == "conversational":
        return ({"prompt": [user(p)], "chosen": [assistant(c)], "rejected": [assistant(r)]},
                ([user(p)], [assistant(c)], [assistant(r)]))
    if fmt == "conversational_implicit":
        return ({"chosen": [user(p), assistant(c)], "rejected": [user(p), assistant(r)]},
                ([user(p)], [assistant(c)], [assistant(r)]))
    if fmt == "hh":
        head = f"\n\nHuman: {p}\n\nAssistant:"
        return {"chosen": head + " " + c, "rejected": head + " " + r}, (head, " " + c, " " + r)
    if fmt == "segment":
        return ({"history": [user(p)], "chosen": [assistant(c)], "rejected": [assistant(r)]},
                ([user(p)], [assistant(c)], [assistant(r)]))
    if fmt == "sharegpt":
        return ({"conversations": [{"from": "human", "value": p}], "chosen": {"from": "gpt", "value": c},
                 "rejected": {"from": "gpt", "value": r}}, ([user(p)], [assistant(c)], [assistant(r)]))
    assert fmt == "stack_exchange"
    return ({"question": p, "response_j": c, "response_k": r},
            (f"Question: {p}\n\nAnswer: ", c, r))


PAIRED = ["plain", "conversational", "conversational_implicit", "hh", "sharegpt", "stack_exchange", "segment"]


def other_kind(fmt: str, p: str, c: str) -> dict:
    """A well-formed record of a format that is not paired (unpaired, SFT, prompts)."""
    return {"unpaired": {"prompt": p, "completion": c, "label": True},
            "messages_label": {"messages": [user(p), assistant(c)], "kto_tag": "false"},
            "prompt_completion": {"prompt": [user(p)], "completion": assistant(c)},
            "messages": {"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": c}]},
            "prompt_only": {"prompt": p}}[fmt]


ALL_FORMATS = st.sampled_from(PAIRED).flatmap(lambda f: st.builds(lambda p, c, r: well_formed(f, p, c, r)[0],
                                                                   SAFE, SAFE, SAFE)) | \
    st.sampled_from(["unpaired", "messages_label", "prompt_completion", "messages", "prompt_only"]).flatmap(
        lambda f: st.builds(lambda p, c: other_kind(f, p, c), SAFE, SAFE))


@st.composite
def mutated(draw, value):
    """``value`` with one node somewhere inside it (the whole, a field, a message, a role...)
    replaced by a value of any type: wrong types at every field."""
    children = list(value) if isinstance(value, dict) else list(range(len(value))) if isinstance(value, list) else []
    if not children or draw(st.integers(0, 3)) == 0:
        return draw(st.one_of(ANY, MESSAGE, st.just(None)))
    key = draw(st.sampled_from(children))
    out = dict(value) if isinstance(value, dict) else list(value)
    if isinstance(out, dict) and draw(st.integers(0, 4)) == 0:
        del out[key]  # a field or a message's role/content missing
    else:
        out[key] = draw(mutated(value[key]))
    return out


@st.composite
def good_records(draw, fmt: str) -> tuple[dict, tuple]:
    p, c, r = draw(SAFE), draw(SAFE), draw(SAFE)
    return well_formed(fmt, p, c, r if r != c else r + "x")


@st.composite
def wild_leaf(draw, value):
    """``value`` with one of the strings inside it replaced by any text."""
    if isinstance(value, str):
        return draw(WILD)
    children = list(value) if isinstance(value, dict) else list(range(len(value)))
    key = draw(st.sampled_from(children))
    out = dict(value) if isinstance(value, dict) else list(value)
    out[key] = draw(wild_leaf(value[key]))
    return out


@st.composite
def bad_records(draw, fmt: str) -> dict:
    """A record of ``fmt`` broken one way, or a record of another shape altogether."""
    record, _ = draw(good_records(fmt))
    how = draw(st.sampled_from(["drop", "retype", "wild_text", "wild_text", "wild_text", "message", "other_format",
                                "random", "deep"]))
    key = draw(st.sampled_from(sorted(record)))
    if how == "drop":
        del record[key]
    elif how == "retype":
        record = draw(mutated(record))
        record = record if isinstance(record, dict) else {"prompt": record}
    elif how == "wild_text":  # any text, at any string inside the record (a message's content...)
        record = draw(wild_leaf(record))
    elif how == "message":
        turns = record[key] if isinstance(record[key], list) else [record[key]]
        turns[draw(st.integers(0, len(turns) - 1))] = draw(MESSAGE)
        record[key] = turns if draw(st.booleans()) else turns[0]
    elif how == "other_format":
        record = draw(good_records(draw(st.sampled_from(PAIRED))))[0]
        record = {**record, **draw(st.dictionaries(st.sampled_from(KEYS), ANY, max_size=1))}
    elif how == "random":
        record = draw(st.dictionaries(st.sampled_from(KEYS) | WILD, ANY, max_size=4))
    else:  # nested in lists: written as text, since json.dumps itself cannot go 1200 deep
        depth = draw(st.sampled_from([3, 150, 1200]))
        record[key] = Deep(record[key], depth)
    return record


@dataclass
class Deep:
    value: object
    depth: int


def encode_json(record: dict, raw_surrogates: bool = False) -> bytes:
    deep = {k: v for k, v in record.items() if isinstance(v, Deep)}
    record = {k: ("\x00deep" if k in deep else v) for k, v in record.items()}
    if raw_surrogates:  # surrogates written as raw bytes (CESU-8): an invalid UTF-8 line
        text = json.dumps(record, ensure_ascii=False)
    else:
        text = json.dumps(record)  # ensure_ascii: a lone surrogate as its "\ud800" escape
    for d in deep.values():
        text = text.replace(json.dumps("\x00deep"), "[" * d.depth + json.dumps(d.value) + "]" * d.depth, 1)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def lines(draw, fmt: str) -> Line:
    kind = draw(st.sampled_from(["good"] * 4 + ["bad"] * 3 + ["bytes"]))
    if kind == "good":
        record, expected = draw(good_records(fmt))
        return Line(encode_json(record), fmt, expected)
    if kind == "bad":
        return Line(encode_json(draw(bad_records(fmt)), raw_surrogates=draw(st.integers(0, 3)) == 0))
    good = encode_json(draw(good_records(fmt))[0])
    broken = draw(st.sampled_from(["invalid_utf8", "truncated", "not_object", "not_json"]))
    if broken == "invalid_utf8":
        at = draw(st.integers(0, len(good)))
        return Line(good[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])) + good[at:])
    if broken == "truncated":
        return Line(good[:draw(st.integers(1, len(good) - 1))])
    return Line(draw(st.sampled_from([b"[1, 2]", b"null", b"3", b'"text"'])) if broken == "not_object"
                else draw(st.sampled_from([b"not json", b"{'single': 'quotes'}", b"{,}", b"}"])))


@st.composite
def files(draw) -> tuple[list[Line], bytes, bytes]:
    fmt = draw(st.sampled_from(PAIRED))
    body = draw(st.lists(lines(fmt), min_size=1, max_size=8))
    return body, draw(st.sampled_from([b"\n", b"\r\n"])), draw(st.sampled_from([b"", b"\xef\xbb\xbf"]))


def write(path: Path, body: list[Line], end: bytes, bom: bytes, blank_every: int = 3) -> list[int]:
    """Write the file (a blank line after every few records); the line number of each record."""
    out, numbers = [], []
    for i, line in enumerate(body):
        numbers.append(len(out) + 1)
        out.append(line.data)
        if i % blank_every == blank_every - 1:
            out.append(b"")
    path.write_bytes(bom + end.join(out) + end)
    return numbers


# ---------------------------------------------------------------------------- running the pipeline
@dataclass
class Outcome:
    report: DataReport
    examples: list             # canonical examples (load_examples)
    encoded: list              # what reached the model
    error: Exception | None


def run(source, tokenizer, on_error: str, **cfg) -> Outcome:
    """What prepare_datasets does for one paired dataset, keeping the intermediate examples."""
    report, examples, encoded = DataReport("train", on_error), [], []
    config = DataConfig(max_length=MAX_LENGTH, on_error=on_error, **cfg)
    try:
        examples = load_examples(source, config, report)
        encoder = Encoder(tokenizer, config.max_length, config.max_prompt_length, config.prompt_truncation,
                          config.truncation)
        encoded = encode(examples, "paired", encoder, report).examples
    except (DataError, ConfigError) as e:  # anything else fails the test with its traceback
        return Outcome(report, examples, encoded, e)
    return Outcome(report, examples, encoded, None)


def check_rejects_file(report: DataReport, path: Path) -> None:
    """The rejects file can always be written and read back, one JSON object per reject."""
    path.unlink(missing_ok=True)
    report.write_rejects(path)
    rows = path.read_text(encoding="utf-8").splitlines() if report.rejects else []
    assert [json.loads(row)["where"] for row in rows] == [r["where"] for r in report.rejects]


# ---------------------------------------------------------------------------- properties
def good_line(fmt: str = "plain", p: str = "Hi", c: str = "a", r: str = "b") -> Line:
    record, expected = well_formed(fmt, p, c, r)
    return Line(encode_json(record), fmt, expected)


def raw(text: str) -> Line:
    return Line(text.encode("utf-8", "surrogatepass"))


# Each reported defect, run every time (random exploration rarely combines them like this).
DEFECTS = [
    [good_line(), raw(r'{"prompt": "Q\ud800?", "chosen": " a", "rejected": " b"}'), good_line(p="Yo")],
    [good_line(), raw('{"prompt": ' + "[" * 1200 + '"x"' + "]" * 1200 + ', "chosen": " a", "rejected": " b"}')],
    [good_line(), Line(b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}'), good_line(p="Yo"),
     Line(good_line().data[:20])],                                           # invalid UTF-8, cut-off last line
    [raw('{"prompt": "Hi", "completion": " a"}'), good_line(), good_line(p="Yo")],  # stray first record
    [raw('{"prompt": "Hi", "chosen": " a"}'), good_line(), good_line(p="Yo")],      # first record lacks rejected
    [raw(r'{"prompt": "N\u0000L", "chosen": " a", "rejected": " b"}'),
     raw(json.dumps({"prompt": "word " * 300, "chosen": " a", "rejected": " b"}))],  # NUL kept, too long
    [Line(b"not json"), Line(b"[1]")],                                       # nothing survives
    [raw('{"x": 1}'), Line(b"{")],                                           # no known layout
    [good_line("conversational"), raw(json.dumps({"prompt": [{"content": "no role"}], "chosen": [assistant("a")],
                                                  "rejected": [assistant("b")]}))],  # a message without a role
]


@settings(FUZZ, max_examples=150)
@given(files())
@example(fuzzed=(DEFECTS[0], b"\n", b""))
@example(fuzzed=(DEFECTS[1], b"\r\n", b"\xef\xbb\xbf"))
@example(fuzzed=(DEFECTS[2], b"\r\n", b""))
@example(fuzzed=(DEFECTS[3], b"\n", b"\xef\xbb\xbf"))
@example(fuzzed=(DEFECTS[4], b"\n", b""))
@example(fuzzed=(DEFECTS[5], b"\n", b""))
@example(fuzzed=(DEFECTS[6], b"\n", b""))
@example(fuzzed=(DEFECTS[7], b"\n", b""))
@example(fuzzed=(DEFECTS[8], b"\n", b""))
def test_every_record_is_accepted_or_rejected_at_its_line(tokenizer, tmp_path_factory, fuzzed):
    body, end, bom = fuzzed
    path = tmp_path_factory.getbasetemp() / "fuzz.jsonl"
    numbers = write(path, body, end, bom)
    where = {f"{path}:{n}": line for n, line in zip(numbers, body)}

    skip = run(path, tokenizer, "skip")
    check_accounting(skip, path, where)

    # a well-formed record of the detected format gives exactly its fields
    by_line = {str(e.origin): e for e in skip.examples}
    for name, line in where.items():
        if line.fmt is not None and line.fmt == skip.report.format and skip.error is None:
            assert name in [str(e.origin) for e in skip.encoded]
            e = by_line[name]
            assert (e.prompt, e.chosen, e.rejected) == line.expected

    # raise stops at the first record skip rejects, with the same problem
    stop = run(path, tokenizer, "raise")
    if not skip.report.rejects:
        assert type(stop.error) is type(skip.error)
        if stop.error is None:
            assert [e.origin for e in stop.encoded] == [e.origin for e in skip.encoded]
    elif isinstance(skip.error, DataUnusable) and skip.error.where != str(path):  # no known layout
        assert isinstance(stop.error, DataError) and stop.error.where in where  # a malformed line, or that
    else:
        first = skip.report.rejects[0]
        assert isinstance(stop.error, DataError) and stop.error.where == first["where"]
        assert stop.error.problem == first["problem"] + " (set data.on_error: skip to skip such records)"


def check_accounting(skip: Outcome, path: Path, where: dict) -> None:
    """Under skip: every record accepted or rejected once, at its own line, with a reason; an error
    only when nothing survives (or the data is not paired), naming the file or a record's line."""
    check_rejects_file(skip.report, path.with_suffix(".rejects"))
    rejected = [r["where"] for r in skip.report.rejects]
    assert len(set(rejected)) == len(rejected) and set(rejected) <= set(where)
    assert all(r["problem"] and r["reason"] for r in skip.report.rejects)
    accepted = [str(e.origin) for e in skip.encoded]
    for reason in skip.report.rejected:  # --hypothesis-show-statistics: what the runs exercised
        event(f"rejected: {reason}")
    event(f"outcome: {type(skip.error).__name__}")
    dropped = sum(skip.report.dropped.values())  # pairs made identical by truncation (not by origin)
    if skip.error is None:
        assert skip.report.records == len(where) == len(accepted) + len(rejected) + dropped
        assert set(accepted + rejected) <= set(where) and len(set(accepted + rejected)) == len(accepted + rejected)
        assert skip.report.examples == len(accepted) and sum(skip.report.rejected.values()) == len(rejected)
        assert all(len(e.prompt_ids) + max(map(len, e.completions.values())) <= MAX_LENGTH for e in skip.encoded)
    elif isinstance(skip.error, DataUnusable) and skip.error.where != str(path):  # no known layout at all
        assert skip.report.format is None and skip.error.where in where
        assert skip.error.problem.startswith("cannot detect the data format")
    elif isinstance(skip.error, DataUnusable):  # nothing survived, and every record says why
        assert not skip.encoded and sorted(rejected) == sorted(where)
        assert str(skip.error).startswith(f"{path}: no usable examples in the train data (")
    else:  # most records are of a kind that is not paired (SFT, prompts): named at a record's line
        assert isinstance(skip.error, ConfigError) and str(skip.error).split(": ")[0] in where


@st.composite
def bad_first(draw) -> tuple[Line, list[Line]]:
    fmt = draw(st.sampled_from(PAIRED))
    first = draw(lines(fmt).filter(lambda line: line.fmt is None))
    return first, [Line(encode_json(r), fmt, e) for r, e in draw(st.lists(good_records(fmt), min_size=2, max_size=4))]


@settings(FUZZ, max_examples=40)
@given(bad_first())
def test_skip_never_fails_on_the_first_records_shape(tokenizer, tmp_path_factory, case):
    """Whatever the first record is, a skip run reads the good records after it."""
    first, good = case
    path = tmp_path_factory.getbasetemp() / "first.jsonl"
    write(path, [first] + good, b"\n", b"")
    outcome = run(path, tokenizer, "skip")
    assert outcome.error is None and outcome.report.format == good[0].fmt
    assert [(e.prompt, e.chosen, e.rejected) for e in outcome.examples][-len(good):] == [g.expected for g in good]


@settings(FUZZ, max_examples=40)
@given(files())
def test_json_array_reads_every_record_or_stops_at_a_line(tokenizer, tmp_path_factory, fuzzed):
    """The same records as one JSON array (one element per line): a record that parses is accepted or
    rejected at its line; bytes the parser cannot get past stop the file at their line, in both modes
    (an array cannot be resynchronised)."""
    body, end, bom = fuzzed
    path = tmp_path_factory.getbasetemp() / "fuzz.json"
    path.write_bytes(bom + b"[" + end + (b"," + end).join(line.data for line in body) + end + b"]" + end)
    where = {f"{path}:{n + 2}": line for n, line in enumerate(body)}
    skip = run(path, tokenizer, "skip")
    if isinstance(skip.error, DataError) and not isinstance(skip.error, DataUnusable):
        assert re.fullmatch(rf"{re.escape(str(path))}:\d+", skip.error.where)
        assert 1 <= int(skip.error.where.rsplit(":", 1)[1]) <= len(body) + 2
        assert str(run(path, tokenizer, "raise").error) == str(skip.error)
    else:
        check_accounting(skip, path, where)


@settings(FUZZ, max_examples=300)
@given(st.lists(ALL_FORMATS.flatmap(lambda r: st.one_of(mutated(r), mutated(r).flatmap(mutated))),
                min_size=1, max_size=3))
def test_every_format_adapter_converts_or_names_the_problem(records):
    """Every adapter, given any record with any value anywhere inside it, returns a valid example
    or raises RecordProblem (a reason and a message), never another exception."""
    from prefopt.data.formats import recognise

    for record in records:
        if not isinstance(record, dict):
            continue
        recognise(record)
        for fmt in FORMATS.values():
            try:
                converted = convert(fmt, record, Origin("<fuzz>", 0))
            except RecordProblem as problem:
                assert problem.reason and str(problem)
                continue
            assert converted.origin == Origin("<fuzz>", 0)


@settings(FUZZ, max_examples=80)
@given(st.lists(st.one_of(st.dictionaries(st.sampled_from(KEYS) | WILD, ANY, max_size=4),
                          st.builds(lambda fmt, p, c, r: well_formed(fmt, p, c, r)[0],
                                    st.sampled_from(PAIRED), SAFE, SAFE, SAFE),
                          ANY), min_size=1, max_size=6))
def test_in_memory_records_of_any_shape(tokenizer, rows):
    """A list of Python objects (surrogates as they are, not escaped; non-dict rows) is read the
    same way: every row accepted or rejected as '<list> record N'."""
    outcome = run(rows, tokenizer, "skip")
    where = {f"<list> record {i + 1}" for i in range(len(rows))}
    rejected = [r["where"] for r in outcome.report.rejects]
    assert len(set(rejected)) == len(rejected) and set(rejected) <= where
    if outcome.error is None:
        assert sorted([str(e.origin) for e in outcome.encoded] + rejected) == sorted(where)
    else:
        assert isinstance(outcome.error, (DataUnusable, ConfigError)) and not outcome.encoded


PIECE = st.one_of(SAFE, WILD, st.builds(lambda w, n: w * n, SAFE, st.integers(1, 30)))  # the last: long


@settings(FUZZ, max_examples=150)
@given(prompt=PIECE, shared=PIECE | st.just(""), tails=st.tuples(PIECE, PIECE), conversational=st.booleans(),
       max_length=st.integers(2, 48), max_prompt_length=st.none() | st.integers(1, 8),
       truncation=st.sampled_from(["auto", "strict"]))
def test_encoder_truncates_and_counts_or_names_the_problem(tokenizer, prompt, shared, tails, conversational,
                                                          max_length, max_prompt_length, truncation):
    """The tokeniser on any text: ids within max_length, every cut a counted prefix (or suffix of a
    prompt, keep_end), a pair made identical by the cut counted (strict) or dropped (auto); or a
    RecordProblem (a prompt with no room: strict only). Completions that share a long start become
    identical when cut: that case is drawn often on purpose."""
    from prefopt.data.tokenize import ExampleDropped
    from prefopt.data.schema import validate_pair

    chosen, rejected = " " + shared + tails[0], " " + shared + tails[1] + ("!" if tails[0] == tails[1] else "")
    if conversational:
        prompt, chosen, rejected = [user(prompt)], [assistant(chosen)], [assistant(rejected)]
    max_prompt_length = max_prompt_length if max_prompt_length and max_prompt_length < max_length else None
    try:
        prompt, chosen, rejected = validate_pair(prompt, chosen, rejected)
    except RecordProblem as problem:
        assert problem.reason in ("empty", "identical", "invalid_unicode")
        event(f"invalid pair: {problem.reason}")
        return
    example = PreferenceExample(prompt, chosen, rejected, Origin("<fuzz>", 0))
    full_report, report = DataReport("train"), DataReport("train")
    full = Encoder(tokenizer, 1 << 20, truncation="strict").encode(example, full_report)  # identical: kept
    encoder = Encoder(tokenizer, max_length, max_prompt_length, truncation=truncation)
    try:
        cut = encoder.encode(example, report)
    except RecordProblem as problem:
        assert problem.reason == "too_long" and max_prompt_length is None and truncation == "strict"
        assert len(full.prompt_ids) >= max_length
        event("prompt too long")
        return
    except ExampleDropped as dropped:
        assert dropped.reason == "identical_after_truncation" and truncation == "auto"
        cut = None
    longest = max(map(len, full.completions.values()))
    if max_prompt_length is not None:
        limit = max_prompt_length
    elif truncation == "auto" and len(full.prompt_ids) + longest > max_length:
        limit = max(max_length - longest, max_length // 2)  # room for the longest, or half the window
    else:
        limit = None
    cut_prompt = limit is not None and len(full.prompt_ids) > limit
    prompt_ids = full.prompt_ids[-limit:] if cut_prompt else full.prompt_ids
    room = max_length - len(prompt_ids)
    identical = full.completions["chosen"][:room] == full.completions["rejected"][:room]
    if cut is None:  # a dropped pair's cuts are not counted: the counts describe the examples kept
        assert identical and not any(k.endswith("truncated") or k.startswith("pairs") for k in report.counts)
        event("dropped: identical after truncation")
        return
    assert report.counts["prompt_truncated"] == cut_prompt
    for role in ("chosen", "rejected"):
        assert report.counts[f"{role}_truncated"] == (len(full.completions[role]) > room)
    assert cut.prompt_ids == prompt_ids and len(prompt_ids) < max_length
    for role in ("chosen", "rejected"):
        assert cut.completions[role] == full.completions[role][:room]
    assert report.counts["pairs_identical_after_truncation"] == identical and (truncation == "strict" or not identical)
    event(f"{truncation}: " + ("identical after truncation" if identical else "completion cut"
                               if room < longest else "fits"))


# ---------------------------------------------------------------------------- targeted examples
def test_one_megabyte_strings(tmp_path, tokenizer):
    """A 1 MB prompt is too long under strict truncation (refused before its completions are
    tokenised; auto cuts it like any long prompt); a 1 MB completion is cut to fit and counted. One
    file, one run: each 1 MB tokenisation costs ~2 s here."""
    big = "lorem ipsum " * ((1 << 20) // 12)
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"prompt": big, "chosen": " a", "rejected": " b"}) + "\n"
                    + json.dumps({"prompt": "Hi", "chosen": big, "rejected": " b"}) + "\n", encoding="utf-8")
    skip = run(path, tokenizer, "skip", truncation="strict")
    assert (skip.report.records, skip.report.examples, dict(skip.report.rejected)) == (2, 1, {"too_long": 1})
    assert skip.report.rejects[0]["where"] == f"{path}:1"
    assert re.match(r"the prompt has \d{6} tokens, leaving no room", skip.report.rejects[0]["problem"])
    (example,) = skip.encoded
    assert skip.report.counts["chosen_truncated"] == 1 and not skip.report.counts["rejected_truncated"]
    assert len(example.prompt_ids) + len(example.completions["chosen"]) == MAX_LENGTH


def test_skip_never_fails_on_these_first_records(tmp_path, tokenizer):
    """The first records of the reported defects, each before three good records."""
    good = [json.dumps({"prompt": f"q{i}", "chosen": " a", "rejected": " b"}) for i in range(3)]
    firsts = ['{"prompt": "Hi", "chosen": " a"}', '{"prompt": "Hi", "completion": " a"}', '{"x": 1}',
              '{"prompt": "Hi"}', '{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "c"}',
              "[]", "{", '{"prompt": "\\ud800", "chosen": " a", "rejected": " b"}']
    for first in firsts:
        path = tmp_path / "data.jsonl"
        path.write_text("\n".join([first] + good) + "\n", encoding="utf-8")
        outcome = run(path, tokenizer, "skip")
        assert outcome.error is None, first
        assert (outcome.report.format, len(outcome.encoded), outcome.report.rejects[0]["where"]) == (
            "plain", 3, f"{path}:1"), first
