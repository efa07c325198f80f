"""Bad input gives a clear message naming the file and line, or is skipped and counted.

Each bad record is checked twice: alone after a good record with ``on_error="raise"`` (the
exact ``path:line: problem`` message), and all together with ``on_error="skip"`` (the
counts by reason and the rejects file).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefopt.config import DataConfig
from prefopt.data.pipeline import load_examples, prepare_datasets
from prefopt.data.report import DataReport, DataUnusable
from prefopt.errors import ConfigError, DataError

MAX_LENGTH = 32
SKIP_HINT = " (set data.on_error: skip to skip such records)"
GOOD = [{"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"},
        {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Rome"},
        {"prompt": "Colour of the sky?", "chosen": " Blue", "rejected": " Green"}]
LONG_PROMPT = "Tell me everything about the history of the world, in great detail, please. " * 3

# (case, raw JSONL line, reason, exact problem text)
BAD = [
    ("malformed_json", '{"prompt": "x", "chosen": "y" "rejected": "z"}', "malformed",
     "malformed JSON: Expecting ',' delimiter (column 31)"),
    ("not_an_object", '["prompt", "chosen", "rejected"]', "malformed",
     "expected a JSON object, got list"),
    ("null_field", json.dumps({"prompt": "Hi", "chosen": " a", "rejected": None}), "missing_field",
     "[plain] field 'rejected' is null"),
    ("wrong_type", json.dumps({"prompt": "Hi", "chosen": 42, "rejected": " b"}), "wrong_type",
     "[plain] chosen must be text or a list of messages, got int"),
    ("mixed_text_and_messages", json.dumps({"prompt": "Hi", "chosen": [{"role": "assistant", "content": "a"}],
                                            "rejected": " b"}), "wrong_type",
     "[plain] chosen is a message list but the prompt is text"),
    ("empty_prompt", json.dumps({"prompt": "  \n", "chosen": " a", "rejected": " b"}), "empty",
     "[plain] prompt is empty"),
    ("empty_completion", json.dumps({"prompt": "Hi", "chosen": " a", "rejected": ""}), "empty",
     "[plain] rejected is empty"),
    ("identical", json.dumps({"prompt": "Hi", "chosen": " same", "rejected": " same"}), "identical",
     "[plain] chosen and rejected are identical"),
]


def prompt_tokens(tokenizer) -> int:
    return len(tokenizer(LONG_PROMPT)["input_ids"])


def too_long_case(tokenizer):
    n = prompt_tokens(tokenizer)
    assert n >= MAX_LENGTH
    return ("too_long", json.dumps({"prompt": LONG_PROMPT, "chosen": " a", "rejected": " b"}), "too_long",
            f"the prompt has {n} tokens, leaving no room for a completion within "
            f"data.max_length={MAX_LENGTH} (data.truncation: strict); data.truncation: auto cuts long prompts "
            f"to fit, data.max_prompt_length caps them")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def prepare(path, tokenizer, on_error="raise", **cfg):
    """Strict truncation: a prompt that leaves no room for a completion is a bad record here (the
    default, auto, cuts it: tests/test_data_defaults.py)."""
    cfg = DataConfig(max_length=MAX_LENGTH, on_error=on_error, **{"truncation": "strict", **cfg})
    train, _ = prepare_datasets(cfg, tokenizer, "paired", train_source=path)
    return train


@pytest.mark.parametrize("case", [c[0] for c in BAD] + ["too_long"])
def test_bad_record_stops_with_file_line_and_problem(case, tmp_path, tokenizer):
    cases = {c[0]: c for c in BAD + [too_long_case(tokenizer)]}
    _, line, _, problem = cases[case]
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD[0]), "", line, json.dumps(GOOD[1])])
    with pytest.raises(DataError) as err:
        prepare(path, tokenizer)
    assert err.value.where == f"{path}:3"
    assert str(err.value) == f"{path}:3: {problem}{SKIP_HINT}"


def test_unknown_format_name(tmp_path, tokenizer):
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD[0])])
    with pytest.raises(ConfigError) as err:
        prepare(path, tokenizer, format="plian")
    assert str(err.value).startswith("data.format: unknown data format 'plian' (did you mean 'plain'?); "
                                     "valid: auto, conversational, conversational_implicit, hh, ")


def test_record_of_unknown_layout(tmp_path, tokenizer):
    path = write_lines(tmp_path / "data.jsonl", ["", json.dumps({"instruction": "a", "output": "b"})])
    with pytest.raises(DataError) as err:
        prepare(path, tokenizer)
    assert str(err.value).startswith(f"{path}:2: cannot detect the data format from the keys "
                                     f"['instruction', 'output']; known formats: ")
    assert "data.columns" in str(err.value)


def test_wrongly_typed_message_fields(tmp_path, tokenizer):
    good = {"prompt": [{"role": "user", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    bad_role = {**good, "prompt": [{"role": "narrator", "content": "Hi"}]}
    bad_content = {**good, "rejected": [{"role": "assistant", "content": 7}]}
    user_reply = {**good, "chosen": [{"role": "user", "content": "a"}]}
    path = write_lines(tmp_path / "conv.jsonl", [json.dumps(r) for r in (good, bad_role, bad_content, user_reply)])
    report = DataReport("train", "skip")
    examples = load_examples(path, DataConfig(), report)
    assert len(examples) == 1 and report.rejected == {"wrong_type": 3}
    assert [(r["where"], r["problem"]) for r in report.rejects] == [
        (f"{path}:2", "[conversational] prompt[0] has unknown role 'narrator'; expected one of "
                      "system, user, assistant, tool"),
        (f"{path}:3", "[conversational] rejected[0].content must be a string, got int"),
        (f"{path}:4", "[conversational] chosen must start with an assistant message, got role 'user'"),
    ]


def test_skip_keeps_good_records_counts_and_writes_rejects(tmp_path, tokenizer):
    bad = BAD + [too_long_case(tokenizer)]
    lines = [json.dumps(GOOD[0])]
    for i, (_, line, _, _) in enumerate(bad):
        lines.append(line)
        if i == 3:
            lines += ["", json.dumps(GOOD[1])]
    lines.append(json.dumps(GOOD[2]))
    path = write_lines(tmp_path / "data.jsonl", lines)
    # line numbers: good 1; bad 2-5; blank 6; good 7; bad 8-12; good 13
    bad_lines = [2, 3, 4, 5, 8, 9, 10, 11, 12]

    train = prepare(path, tokenizer, on_error="skip")
    report = train.report
    assert report.records == 12
    assert report.examples == 3 and len(train) == 3
    assert [str(e.origin) for e in train.examples] == [f"{path}:{n}" for n in (1, 7, 13)]
    assert dict(report.rejected) == {"malformed": 2, "missing_field": 1, "wrong_type": 2, "empty": 2,
                                     "identical": 1, "too_long": 1}
    assert sum(report.rejected.values()) == len(bad)
    assert "train: 12 records (plain) -> 3 examples; truncated: none; rejected " in report.summary()

    rejects_file = tmp_path / "out" / "rejected_records.jsonl"
    report.write_rejects(rejects_file)
    rows = [json.loads(line) for line in rejects_file.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(bad)
    assert sorted(r["where"] for r in rows) == sorted(f"{path}:{n}" for n in bad_lines)
    by_where = {r["where"]: r for r in rows}
    for n, (_, line, reason, problem) in zip(bad_lines, bad):
        row = by_where[f"{path}:{n}"]
        assert (row["dataset"], row["reason"], row["problem"]) == ("train", reason, problem)
        if reason == "malformed":
            assert row["record"] == line  # the unparsable text itself
        elif reason == "too_long":
            assert row["record"] is None
        else:
            assert row["record"] == json.loads(line)

    # appending: a second report adds its own lines
    report.write_rejects(rejects_file)
    assert len(rejects_file.read_text(encoding="utf-8").splitlines()) == 2 * len(bad)


def test_skip_with_nothing_left_is_an_error(tmp_path, tokenizer):
    path = write_lines(tmp_path / "data.jsonl", [BAD[0][1], BAD[1][1]])
    with pytest.raises(DataUnusable) as err:
        prepare(path, tokenizer, on_error="skip")
    assert str(err.value) == (f"{path}: no usable examples in the train data (train: 2 records (format unknown) "
                              f"-> 0 examples; truncated: none; rejected 2 malformed)")
    (report,) = err.value.reports  # handed on, so the caller can write why before stopping
    assert [r["where"] for r in report.rejects] == [f"{path}:1", f"{path}:2"]


def test_nothing_left_still_writes_the_data_report_and_the_rejects(tiny_model_dir, tmp_path):
    """A run that stops for want of examples leaves the reasons in OUTPUT_DIR, like any other run."""
    from prefopt import DPOConfig, DPOTrainer

    train = write_lines(tmp_path / "train.jsonl", [json.dumps(GOOD[0]), json.dumps(GOOD[1])])
    evaluation = write_lines(tmp_path / "eval.jsonl", [BAD[0][1], BAD[7][1]])  # malformed, identical
    out = tmp_path / "out"
    trainer = DPOTrainer(str(tiny_model_dir), None, train_dataset=str(train), eval_dataset=str(evaluation),
                         args=DPOConfig(output_dir=str(out), on_error="skip", max_length=MAX_LENGTH,
                                        progress_bar=False))
    with pytest.raises(DataError) as err:
        trainer.setup()
    assert str(err.value) == (f"{evaluation}: no usable examples in the eval data (eval: 2 records (plain) -> "
                              f"0 examples; truncated: none; rejected 1 malformed, 1 identical)")
    reports = json.loads((out / "data_report.json").read_text())
    assert [(r["dataset"], r["source"], r["records"], r["examples"], r["rejected"]) for r in reports] == [
        ("train", str(train), 2, 2, {}), ("eval", str(evaluation), 2, 0, {"malformed": 1, "identical": 1})]
    rows = [json.loads(line) for line in (out / "rejected_records.jsonl").read_text().splitlines()]
    assert [(r["dataset"], r["where"], r["reason"]) for r in rows] == [
        ("eval", f"{evaluation}:1", "malformed"), ("eval", f"{evaluation}:2", "identical")]


def test_json_array_with_a_syntax_error(tmp_path, tokenizer):
    path = tmp_path / "data.json"
    path.write_text('[\n'
                    '  {"prompt": "a", "chosen": " b", "rejected": " c"},\n'
                    '  {"prompt": "d",\n'
                    '   "chosen": " e"\n'
                    '   "rejected": " f"},\n'
                    '  {"prompt": "g", "chosen": " h", "rejected": " i"}\n'
                    ']\n', encoding="utf-8")
    for on_error in ("raise", "skip"):  # the rest of an array cannot be recovered
        with pytest.raises(DataError) as err:
            prepare(path, tokenizer, on_error=on_error)
        assert err.value.where == f"{path}:5"
        assert str(err.value) == (f"{path}:5: malformed JSON: Expecting ',' delimiter (column 4); "
                                  f"records before it were read fine")


def test_json_array_missing_comma_between_records(tmp_path, tokenizer):
    path = tmp_path / "data.json"
    path.write_text('[\n'
                    '  {"prompt": "a", "chosen": " b", "rejected": " c"}\n'
                    '  {"prompt": "d", "chosen": " e", "rejected": " f"}\n'
                    ']\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        prepare(path, tokenizer)
    assert str(err.value) == f"{path}:3: malformed JSON: expected ',' or ']' after a record"


def test_truncated_json_array(tmp_path, tokenizer):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"prompt": "a", "chosen": " b", "rejected": " c"},\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        prepare(path, tokenizer, on_error="skip")
    assert str(err.value) == (f"{path}:3: malformed JSON: the array is not closed with ']' "
                              f"(is the file truncated?)")


def test_json_array_element_that_is_not_an_object(tmp_path, tokenizer):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"prompt": "a", "chosen": " b", "rejected": " c"},\n  "oops"\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        prepare(path, tokenizer)
    assert str(err.value) == f"{path}:3: expected a JSON object, got str{SKIP_HINT}"


def test_csv_row_with_too_many_fields(tmp_path, tokenizer):
    path = tmp_path / "data.csv"
    path.write_text("prompt,chosen,rejected\nq, a, b\nq, a, b, extra\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        prepare(path, tokenizer)
    assert str(err.value) == f"{path}:3: row has more fields than the header (3){SKIP_HINT}"


def test_unsupported_file_type(tmp_path, tokenizer):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError) as err:
        prepare(path, tokenizer)
    assert str(err.value).startswith(f"{path}: unsupported file type; expected one of .json, .jsonl, ")


def test_prompt_truncation_avoids_too_long(tmp_path, tokenizer):
    """With max_prompt_length the long prompt is cut (and counted) instead of rejected."""
    lines = [json.dumps(GOOD[0]), too_long_case(tokenizer)[1]]
    path = write_lines(tmp_path / "data.jsonl", lines)
    train = prepare(path, tokenizer, max_prompt_length=16)
    assert len(train) == 2 and not train.report.rejected
    assert train.report.counts["prompt_truncated"] == 1
    assert len(train.examples[1].prompt_ids) == 16


def test_absent_key_lists_the_keys_the_record_has(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD[0]), json.dumps({"prompt": "Hi", "chosen": " a"})])
    with pytest.raises(DataError) as err:
        load_examples(path, DataConfig(), DataReport("train", "raise"))
    assert str(err.value).startswith(f"{path}:2: [plain] missing field 'rejected' (record has: prompt, chosen)")


# ---------------------------------------------------------------------------- invalid text
# JSON's "\ud800" escape without its low half decodes to a lone surrogate: not valid Unicode.
LONE_SURROGATE = r'{"prompt": "Q\ud800?", "chosen": " a", "rejected": " b"}'
SURROGATE_IN_MESSAGE = json.dumps({"prompt": [{"role": "user", "content": "Hi"}],
                                   "chosen": [{"role": "assistant", "content": "a"}],
                                   "rejected": [{"role": "assistant", "content": "b"}]}).replace('"a"', r'"a\udfff"')


def test_lone_surrogate_is_a_record_error_naming_line_and_field(tmp_path, tokenizer):
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD[0]), LONE_SURROGATE])
    with pytest.raises(DataError) as err:
        prepare(path, tokenizer)
    assert str(err.value) == (f"{path}:2: [plain] prompt holds a lone UTF-16 surrogate (U+D800 at "
                              f"character 2), which is not valid Unicode{SKIP_HINT}")

    conv = write_lines(tmp_path / "conv.jsonl", [SURROGATE_IN_MESSAGE])
    with pytest.raises(DataError) as err:
        prepare(conv, tokenizer)
    assert str(err.value) == (f"{conv}:1: [conversational] chosen[0].content holds a lone UTF-16 surrogate "
                              f"(U+DFFF at character 2), which is not valid Unicode{SKIP_HINT}")


def test_lone_surrogate_is_skipped_counted_and_written_back_as_its_escape(tmp_path, tokenizer):
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD[0]), LONE_SURROGATE, json.dumps(GOOD[1])])
    train = prepare(path, tokenizer, on_error="skip")
    assert (train.report.records, train.report.examples) == (3, 2)
    assert train.report.rejected == {"invalid_unicode": 1}
    rejects = tmp_path / "rejected_records.jsonl"
    train.report.write_rejects(rejects)
    assert r'"Q\ud800?"' in rejects.read_text(encoding="utf-8")
    (row,) = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert row["where"] == f"{path}:2" and row["record"]["prompt"] == "Q\ud800?"


def test_encoder_reports_a_lone_surrogate_instead_of_a_type_error(tokenizer):
    """Callers that build examples themselves (judges) get the RecordProblem too."""
    from prefopt.data.schema import Origin, PreferenceExample, RecordProblem
    from prefopt.data.tokenize import Encoder

    ex = PreferenceExample("Q\ud800?", " a", " b", Origin("<list>", 0))
    with pytest.raises(RecordProblem) as err:
        Encoder(tokenizer, 32).encode(ex, DataReport("train"))
    assert (err.value.reason, str(err.value)) == (
        "invalid_unicode", "the text holds a lone UTF-16 surrogate (U+D800 at character 2), which is not valid Unicode")


# ---------------------------------------------------------------------------- deep nesting
TOO_DEEP = "the record is nested more than 100 levels deep (no data format nests that deep)"


def nested(depth: int) -> str:
    return json.dumps({"prompt": "Hi", "chosen": " a", "rejected": " b"}).replace(
        '"Hi"', "[" * depth + '"Hi"' + "]" * depth)


@pytest.mark.parametrize("depth", [150, 1000, 100_000])  # 1000+ overflows the JSON parser's recursion
def test_deeply_nested_line_is_a_record_error(depth, tmp_path, tokenizer):
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD[0]), nested(depth), json.dumps(GOOD[1])])
    with pytest.raises(DataError) as err:
        prepare(path, tokenizer)
    assert str(err.value) == f"{path}:2: {TOO_DEEP}{SKIP_HINT}"
    train = prepare(path, tokenizer, on_error="skip")
    assert (train.report.records, train.report.examples, train.report.rejected) == (3, 2, {"malformed": 1})
    rejects = tmp_path / "rejected_records.jsonl"
    train.report.write_rejects(rejects)  # the raw line is kept; nothing recurses on the nested value
    assert json.loads(rejects.read_text(encoding="utf-8"))["record"] == nested(depth)


def test_deeply_nested_json_array_element_names_its_line(tmp_path, tokenizer):
    path = tmp_path / "data.json"
    path.write_text("[\n" + json.dumps(GOOD[0]) + ",\n" + nested(1000) + "\n]\n", encoding="utf-8")
    for on_error in ("raise", "skip"):  # an array cannot be read past an element it cannot parse
        with pytest.raises(DataError) as err:
            prepare(path, tokenizer, on_error=on_error)
        assert str(err.value) == f"{path}:3: {TOO_DEEP}; records before it were read fine"
    path.write_text("[\n" + json.dumps(GOOD[0]) + ",\n" + nested(150) + "\n]\n", encoding="utf-8")
    train = prepare(path, tokenizer, on_error="skip")  # parsed, then refused: the rest is read
    assert (train.report.records, train.report.examples, train.report.rejects[0]["where"]) == (2, 1, f"{path}:3")


def test_deeply_nested_in_memory_record(tokenizer):
    deep = json.loads(nested(150))
    report = DataReport("train", "skip")
    examples = load_examples([GOOD[0], deep], DataConfig(), report)
    assert len(examples) == 1 and report.rejects[0]["where"] == "<list> record 2"
    assert report.rejects[0]["problem"] == TOO_DEEP


# ---------------------------------------------------------------------------- bytes and line ends
def write_bytes(path: Path, lines: list[bytes], end: bytes = b"\n", bom: bytes = b"") -> Path:
    path.write_bytes(bom + end.join(lines) + end)
    return path


def good_bytes(i: int) -> bytes:
    return json.dumps(GOOD[i]).encode()


BAD_UTF8 = b'{"prompt": "caf\xe9?", "chosen": " a", "rejected": " b"}'  # Latin-1, not UTF-8
BAD_UTF8_PROBLEM = "invalid UTF-8: byte 0xe9 at byte 16 of the line (invalid continuation byte)"


def test_invalid_utf8_line_is_one_bad_record(tmp_path, tokenizer):
    path = write_bytes(tmp_path / "data.jsonl", [good_bytes(0), BAD_UTF8, good_bytes(1)])
    with pytest.raises(DataError) as err:
        prepare(path, tokenizer)
    assert str(err.value) == f"{path}:2: {BAD_UTF8_PROBLEM}{SKIP_HINT}"
    train = prepare(path, tokenizer, on_error="skip")  # the rest of the file is read
    assert (train.report.records, train.report.examples, train.report.rejected) == (3, 2, {"malformed": 1})
    assert [str(e.origin) for e in train.examples] == [f"{path}:1", f"{path}:3"]
    assert train.report.rejects[0]["record"] == BAD_UTF8.decode("utf-8", "backslashreplace")


def test_invalid_utf8_in_a_json_document_names_the_line(tmp_path, tokenizer):
    array = write_bytes(tmp_path / "data.json", [b"[", good_bytes(0) + b",", BAD_UTF8, b"]"])
    single = write_bytes(tmp_path / "one.json", [b"{", b'  "prompt": "caf\xe9?",', b'  "chosen": " a",',
                                                 b'  "rejected": " b"', b"}"])
    for path, line, column in ((array, 3, 16), (single, 2, 17)):
        for on_error in ("raise", "skip"):  # one document: it cannot be read around the byte
            with pytest.raises(DataError) as err:
                prepare(path, tokenizer, on_error=on_error)
            assert str(err.value) == (f"{path}:{line}: invalid UTF-8: byte 0xe9 at byte {column} of the "
                                      f"line (invalid continuation byte); the file must be UTF-8")


def test_utf16_file_is_refused_with_its_encoding(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode("utf-16"))
    with pytest.raises(DataError) as err:
        prepare(path, tokenizer, on_error="skip")
    assert str(err.value) == f"{path}: the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8"


@pytest.mark.parametrize("end", [b"\r\n", b"\r"])
def test_crlf_and_bom_read_like_plain_utf8(end, tmp_path, tokenizer):
    bom = b"\xef\xbb\xbf"
    lines = write_bytes(tmp_path / "data.jsonl", [good_bytes(0), b"", good_bytes(1)], end, bom)
    array = write_bytes(tmp_path / "data.json", [b"[", good_bytes(0) + b",", good_bytes(1), b"]"], end, bom)
    table = write_bytes(tmp_path / "data.csv", [b"prompt,chosen,rejected", b'"Say\r\nhi", a, b', b"q, c, d"],
                        end, bom)
    expected = {lines: ([1, 3], [GOOD[0]["prompt"], GOOD[1]["prompt"]]),
                array: ([2, 3], [GOOD[0]["prompt"], GOOD[1]["prompt"]]),
                table: ([2, 4], ["Say\nhi", "q"])}  # universal newlines, as text mode reads them
    for path, (line_numbers, prompts) in expected.items():
        report = DataReport("train", "raise")
        examples = load_examples(path, DataConfig(), report)
        assert [str(e.origin) for e in examples] == [f"{path}:{n}" for n in line_numbers]
        assert [e.prompt for e in examples] == prompts
        assert all("\r" not in e.chosen and "\ufeff" not in e.prompt for e in examples)


def test_truncated_last_line(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_bytes(good_bytes(0) + b"\n" + good_bytes(1)[:25])  # cut inside a string, no final newline
    with pytest.raises(DataError) as err:
        prepare(path, tokenizer)
    assert str(err.value) == f"{path}:2: malformed JSON: Unterminated string starting at (column 12){SKIP_HINT}"
    train = prepare(path, tokenizer, on_error="skip")
    assert (train.report.records, train.report.examples, train.report.rejected) == (2, 1, {"malformed": 1})


def test_truncated_gzip_file(tmp_path, tokenizer):
    import gzip
    data = gzip.compress(b"\n".join([good_bytes(0), good_bytes(1)]))
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(data[:-10])
    with pytest.raises(DataError) as err:
        prepare(path, tokenizer, on_error="skip")
    assert str(err.value).startswith(f"{path}: cannot read file: Compressed file ended before")


# ---------------------------------------------------------------------------- NUL
def test_nul_in_text_is_kept_and_counted(tmp_path, tokenizer):
    nul_chosen = r'{"prompt": "Hi", "chosen": " a\u0000b", "rejected": " b"}'  # the JSON escape of U+0000
    nul_prompt = r'{"prompt": "Q\u0000", "chosen": " a", "rejected": " b"}'
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD[0]), nul_chosen, nul_prompt])
    train = prepare(path, tokenizer)
    report = train.report
    assert (report.records, report.examples, report.counts["contains_nul"]) == (3, 3, 2)
    assert report.notes == [f"text with NUL characters (U+0000) is kept and counted as contains_nul; the first "
                            f"is chosen at {path}:2"]
    assert "\x00" in tokenizer.decode(train.examples[1].completions["chosen"])  # encoded, not dropped
    assert "contains_nul" in report.as_dict() and "2 contains_nul" in report.summary()

    conv = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "x\x00"}],
            "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    train, _ = prepare_datasets(DataConfig(max_length=64), tokenizer, "unpaired", train_source=[conv])
    assert train.report.counts["contains_nul"] == 2  # the pair is two unpaired examples
    assert train.report.notes[0].endswith("the first is prompt[1].content at <list> record 1")


def test_rejects_file_keeps_one_record_per_line_for_any_reader(tmp_path, tokenizer):
    """U+2028/U+2029/U+0085 are line breaks to str.splitlines(); JSON leaves them raw in strings."""
    odd = {"prompt": "a\u2028b\u2029c\x85d", "chosen": " same", "rejected": " same"}
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD[0]), json.dumps(odd)])
    train = prepare(path, tokenizer, on_error="skip")
    rejects = tmp_path / "rejected_records.jsonl"
    train.report.write_rejects(rejects)
    (row,) = rejects.read_text(encoding="utf-8").splitlines()
    assert json.loads(row)["record"] == odd


def test_json_array_cut_inside_a_record_names_the_record(tmp_path, tokenizer):
    path = tmp_path / "data.json"
    path.write_text('[\n' + json.dumps(GOOD[0]) + ',\n  {"prompt": [{"role": "user", "content": "Hi"}]\n',
                    encoding="utf-8")  # the JSON decoder's own error would point past the last line
    with pytest.raises(DataError) as err:
        prepare(path, tokenizer, on_error="skip")
    assert str(err.value) == (f"{path}:3: malformed JSON: the file ends inside this record (is it truncated?); "
                              f"records before it were read fine")


def test_csv_field_longer_than_csv_default_limit_is_read(tmp_path, tokenizer):
    """csv refuses fields over 128 KB by default; a long prompt is a too_long record, not a crash."""
    import csv
    path = tmp_path / "data.csv"
    path.write_text("prompt,chosen,rejected\nq, a, b\n" + "x " * 100_000 + ", a, b\nq2, c, d\n", encoding="utf-8")
    train = prepare(path, tokenizer, on_error="skip")
    assert (train.report.records, train.report.examples, dict(train.report.rejected)) == (3, 2, {"too_long": 1})
    assert train.report.rejects[0]["where"] == f"{path}:3"
    assert csv.field_size_limit() == 131072  # the process-wide limit is left as it was
