"""Format adapters, kind conversions, column mapping, file types and format detection.

Every test reads through the public data entry points (``load_examples``,
``prepare_datasets``, ``as_kind``) and checks the canonical examples they produce.
"""
from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from prefopt.config import DataConfig
from prefopt.losses import KNOWN_COLUMNS
from prefopt.data.pipeline import as_kind, load_examples, prepare_datasets
from prefopt.data.report import DataReport
from prefopt.data.schema import CompletionExample, Origin, PreferenceExample
from prefopt.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "prefopt" / "demo" / "data" / "dpo_en_demo.json"
HH_40 = ROOT / "tests" / "fixtures" / "hh_harmless_40.jsonl"
KTO_20 = ROOT / "tests" / "fixtures" / "kto_en_demo_20.json"
MARKER = "\n\nAssistant:"
SHAREGPT_ROLE = {"system": "system", "human": "user", "gpt": "assistant"}


def write_jsonl(path: Path, records: list, *, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path


def load(source, on_error: str = "raise", **cfg) -> tuple[list, DataReport]:
    """Load as for an objective that can use every known column."""
    report = DataReport("train", on_error)
    return load_examples(source, DataConfig(**cfg), report, optional_columns=KNOWN_COLUMNS), report


def triples(examples: list) -> list[tuple]:
    return [(e.prompt, e.chosen, e.rejected) for e in examples]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


# ---------------------------------------------------------------------------- sharegpt
def test_sharegpt_demo_data(demo_records):
    examples, report = load(DEMO)
    assert report.format == "sharegpt"
    assert report.records == 300 and not report.rejected
    assert len(examples) == 300
    assert all(isinstance(e, PreferenceExample) and e.conversational for e in examples)
    assert sum(e.prompt[0]["role"] == "system" for e in examples) == 80
    for ex, rec in zip(examples, demo_records):
        # every turn kept, in order, roles mapped human->user, gpt->assistant
        assert ex.prompt == [{"role": SHAREGPT_ROLE[t["from"]], "content": t["value"]}
                             for t in rec["conversations"]]
        assert ex.chosen == [assistant(rec["chosen"]["value"])]
        assert ex.rejected == [assistant(rec["rejected"]["value"])]
    roles = {m["role"] for e in examples for m in e.prompt}
    assert roles == {"system", "user", "assistant"}  # multi-turn prompts keep earlier replies
    assert all(e.prompt[-1]["role"] == "user" for e in examples)


def test_sharegpt_origins_are_the_lines_objects_start_on():
    examples, _ = load(DEMO)
    starts = [n for n, line in enumerate(DEMO.read_text().split("\n"), start=1) if line == "  {"]
    assert len(starts) == 300
    assert [e.origin.line for e in examples] == starts
    assert examples[0].origin == Origin(str(DEMO), 0, 2)
    assert str(examples[1].origin) == f"{DEMO}:{starts[1]}"


def test_sharegpt_role_content_keys_and_string_completions(tmp_path):
    rec = {"conversations": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "2+2?"}],
           "chosen": "4", "rejected": {"from": "model", "value": "5"}}
    (ex,), report = load(write_jsonl(tmp_path / "s.jsonl", [rec]))
    assert report.format == "sharegpt"
    assert ex.prompt == [system("Be brief."), user("2+2?")]
    assert ex.chosen == [assistant("4")] and ex.rejected == [assistant("5")]


def test_sharegpt_bad_turns_are_rejected_with_reason(tmp_path):
    good = {"conversations": [{"from": "human", "value": "hi"}],
            "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}
    ends_with_gpt = {**good, "conversations": [{"from": "human", "value": "hi"},
                                               {"from": "gpt", "value": "x"}]}
    bad_speaker = {**good, "conversations": [{"from": "robot", "value": "hi"}]}
    list_speaker = {**good, "chosen": {"from": ["gpt"], "value": "a"}}  # unhashable: was a TypeError
    path = write_jsonl(tmp_path / "s.jsonl", [good, ends_with_gpt, bad_speaker, list_speaker])
    examples, report = load(path, on_error="skip")
    assert len(examples) == 1
    assert report.rejected == {"wrong_type": 3}
    speakers = "human, user, gpt, assistant, model, system, observation, tool, function_call"
    assert [(r["where"], r["problem"]) for r in report.rejects] == [
        (f"{path}:2", "[sharegpt] the prompt conversation ends with an assistant turn; the "
                      "completion must follow a user (or tool) turn"),
        (f"{path}:3", f"[sharegpt] conversations[0] has unknown speaker 'robot'; expected one of {speakers}"),
        (f"{path}:4", f"[sharegpt] chosen has unknown speaker ['gpt']; expected one of {speakers}"),
    ]


# ---------------------------------------------------------------------------- hh
def test_hh_fixture_prompt_is_up_to_the_last_assistant_marker():
    records = [json.loads(line) for line in HH_40.read_text().splitlines()]
    examples, report = load(HH_40)
    assert report.format == "hh" and len(examples) == 40 and not report.rejected
    multi_turn = 0
    for ex, rec in zip(examples, records):
        prompt, reply = rec["chosen"].rsplit(MARKER, 1)
        assert ex.prompt == prompt + MARKER
        assert ex.chosen == reply
        assert ex.rejected == rec["rejected"][len(ex.prompt):]
        assert ex.prompt + ex.rejected == rec["rejected"]
        assert MARKER not in ex.chosen and MARKER not in ex.rejected
        multi_turn += ex.prompt.count(MARKER) > 1
    assert multi_turn > 10  # the split really is at the LAST marker of multi-turn dialogues
    assert [e.origin.line for e in examples] == list(range(1, 41))


def test_hh_full_file(shared_data):
    """Every one of the 2,312 pairs is read, its two quirks included (prefopt/data/formats/hh.py)."""
    path = shared_data / "hh_harmless_test.jsonl.gz"
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    examples, report = load(path)
    assert report.format == "hh"
    assert report.records == len(examples) == 2312 and not report.rejected
    by_line = {e.origin.line: e for e in examples}
    # an empty chosen reply (the assistant said nothing): a completion of whitespace, encoded as EOS alone
    for n in (87, 517, 926, 1104):
        assert json.loads(lines[n - 1])["chosen"].endswith(MARKER + " ")
        assert by_line[n].chosen == " " and by_line[n].rejected.strip()
    # dialogues that differ before their own last marker: the prompt is the shared dialogue up to
    # its last marker, the replies run to the end
    for n in (1255, 1689, 1951, 1953, 2037):
        rec, ex = json.loads(lines[n - 1]), by_line[n]
        assert rec["chosen"].rsplit(MARKER, 1)[0] != rec["rejected"].rsplit(MARKER, 1)[0]
        assert ex.prompt + ex.chosen == rec["chosen"] and ex.prompt + ex.rejected == rec["rejected"]
    ex = by_line[1255]
    assert ex.prompt.endswith("\n\nHuman: Isn't that drag kings?" + MARKER)
    assert ex.rejected.startswith(" A drag king is") and ex.chosen.startswith(" No. Men who")
    assert all(e.prompt.endswith(MARKER) for e in examples)


def test_hh_shared_first_word_stays_in_the_completions(tmp_path):
    rec = {"chosen": "\n\nHuman: hi\n\nAssistant: Sure, A", "rejected": "\n\nHuman: hi\n\nAssistant: Sure, B"}
    (ex,), _ = load(write_jsonl(tmp_path / "hh.jsonl", [rec]))
    assert ex.prompt == "\n\nHuman: hi\n\nAssistant:"
    assert (ex.chosen, ex.rejected) == (" Sure, A", " Sure, B")


def test_hh_dialogues_differing_before_the_last_marker(tmp_path):
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    bad = {"chosen": "\n\nHuman: hi\n\nAssistant: a\n\nHuman: ok\n\nAssistant: b",
           "rejected": "\n\nHuman: hello\n\nAssistant: a\n\nHuman: ok\n\nAssistant: c"}
    # the replies differ in an earlier assistant turn: the shared dialogue up to its last marker is the prompt
    late = {"chosen": "\n\nHuman: hi\n\nAssistant: a\n\nHuman: ok\n\nAssistant: b",
            "rejected": "\n\nHuman: hi\n\nAssistant: c"}
    path = write_jsonl(tmp_path / "hh.jsonl", [good, bad, late])
    examples, report = load(path, on_error="skip")
    assert len(examples) == 2 and report.rejected == {"mismatch": 1}
    assert triples(examples[1:]) == [("\n\nHuman: hi\n\nAssistant:", " a\n\nHuman: ok\n\nAssistant: b", " c")]
    assert report.rejects[0]["where"] == f"{path}:2"
    assert report.rejects[0]["problem"] == ("[hh] chosen and rejected dialogues share no '\\n\\nAssistant:' "
                                           "turn (no shared prompt)")
    with pytest.raises(DataError) as err:
        load(path)
    assert str(err.value).startswith(f"{path}:2: [hh] chosen and rejected dialogues share no")


def test_hh_rejected_without_marker(tmp_path):
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    bad = {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "no"}
    path = write_jsonl(tmp_path / "hh.jsonl", [good, bad])
    _, report = load(path, on_error="skip")
    assert report.rejects[0]["problem"] == "[hh] rejected has no '\\n\\nAssistant:' turn"
    assert report.rejected == {"wrong_type": 1}


# ---------------------------------------------------------------------------- stack exchange
def test_stack_exchange(tmp_path):
    recs = [{"qid": 7, "question": "How do I exit vim?", "date": "2020/01/01",
             "response_j": "Type :q and press Enter.", "response_k": "Unplug the computer."},
            {"qid": 8, "question": "Tabs or spaces?\nDiscuss.", "response_j": "Spaces.",
             "response_k": "Both."}]
    examples, report = load(write_jsonl(tmp_path / "se.jsonl", recs))
    assert report.format == "stack_exchange"
    assert triples(examples) == [
        ("Question: How do I exit vim?\n\nAnswer: ", "Type :q and press Enter.", "Unplug the computer."),
        ("Question: Tabs or spaces?\nDiscuss.\n\nAnswer: ", "Spaces.", "Both."),
    ]
    assert not examples[0].conversational


# ---------------------------------------------------------------------------- plain / conversational
def test_plain_strings_kept_verbatim(tmp_path):
    recs = [{"prompt": "Q: 1+1?\nA:", "chosen": " 2", "rejected": " 3\n", "id": 1}]
    (ex,), report = load(write_jsonl(tmp_path / "p.jsonl", recs))
    assert report.format == "plain"
    assert (ex.prompt, ex.chosen, ex.rejected) == ("Q: 1+1?\nA:", " 2", " 3\n")
    assert not ex.conversational and ex.extras == {}


def test_conversational_explicit(tmp_path):
    recs = [{"prompt": [system("Be kind."), user("Hi")],
             "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]},
            {"prompt": [user("Hi")], "chosen": assistant("Hey"), "rejected": assistant("No")}]
    examples, report = load(write_jsonl(tmp_path / "c.jsonl", recs))
    assert report.format == "conversational"
    assert triples(examples) == [
        ([system("Be kind."), user("Hi")], [assistant("Hello!")], [assistant("Go away.")]),
        ([user("Hi")], [assistant("Hey")], [assistant("No")]),  # a single message is wrapped
    ]
    assert all(e.conversational for e in examples)


def test_conversational_implicit_prompt_is_the_shared_leading_messages(tmp_path):
    recs = [{"chosen": [system("S"), user("Q"), assistant("good")],
             "rejected": [system("S"), user("Q"), assistant("bad")]},
            {"chosen": [user("a"), assistant("b"), user("c"), assistant("d1")],
             "rejected": [user("a"), assistant("b"), user("c"), assistant("d2")]},
            {"chosen": [user("x"), assistant("y")], "rejected": [user("z"), assistant("y")]}]
    path = write_jsonl(tmp_path / "ci.jsonl", recs)
    examples, report = load(path, on_error="skip")
    assert report.format == "conversational_implicit"
    assert triples(examples) == [
        ([system("S"), user("Q")], [assistant("good")], [assistant("bad")]),
        ([user("a"), assistant("b"), user("c")], [assistant("d1")], [assistant("d2")]),
    ]
    assert report.rejected == {"mismatch": 1}
    assert report.rejects[0]["where"] == f"{path}:3"
    assert report.rejects[0]["problem"] == ("[conversational_implicit] chosen and rejected "
                                           "conversations share no prompt messages")


def test_conversational_identical_answers_rejected(tmp_path):
    recs = [{"chosen": [user("q"), assistant("same")], "rejected": [user("q"), assistant("same")]}]
    path = write_jsonl(tmp_path / "ci.jsonl", recs)
    with pytest.raises(DataError) as err:
        load(path)
    assert str(err.value) == (f"{path}:1: [conversational_implicit] chosen and rejected are identical "
                              f"(set data.on_error: skip to skip such records)")


# ---------------------------------------------------------------------------- unpaired
def test_unpaired_prompt_completion_label(tmp_path):
    recs = [{"prompt": "Hi", "completion": " hello", "label": True},
            {"prompt": "Hi", "completion": " go away", "label": False},
            {"prompt": "Hi", "completion": " hey", "label": "true"},
            {"prompt": [user("Hi")], "completion": [assistant("yo")], "label": 0}]
    examples, report = load(write_jsonl(tmp_path / "u.jsonl", recs))
    assert report.format == "unpaired"
    assert all(isinstance(e, CompletionExample) for e in examples)
    assert [(e.prompt, e.completion, e.label) for e in examples] == [
        ("Hi", " hello", True), ("Hi", " go away", False), ("Hi", " hey", True),
        ([user("Hi")], [assistant("yo")], False)]


def test_unpaired_messages_label_and_kto_tag(tmp_path):
    recs = [{"messages": [user("q1"), assistant("a1")], "label": True},
            {"messages": [user("q2"), assistant("x"), user("q3"), assistant("a3")], "label": False}]
    examples, report = load(write_jsonl(tmp_path / "m.jsonl", recs))
    assert report.format == "messages_label"
    assert [(e.prompt, e.completion, e.label) for e in examples] == [
        ([user("q1")], [assistant("a1")], True),
        ([user("q2"), assistant("x"), user("q3")], [assistant("a3")], False)]

    tagged = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
               "kto_tag": False}]
    (ex,), report = load(write_jsonl(tmp_path / "t.jsonl", tagged))
    assert report.format == "messages_label"
    assert (ex.prompt, ex.completion, ex.label) == ([user("q")], [assistant("a")], False)


def test_unpaired_bad_label(tmp_path):
    recs = [{"prompt": "a", "completion": "b", "label": True},
            {"prompt": "a", "completion": "b", "label": "maybe"},
            {"messages": [user("q")], "label": True}]
    path = write_jsonl(tmp_path / "u.jsonl", recs)
    examples, report = load(path, on_error="skip")
    assert len(examples) == 1
    assert [(r["where"], r["reason"], r["problem"]) for r in report.rejects] == [
        (f"{path}:2", "wrong_type", "[unpaired] field 'label' must be a boolean, got 'maybe'"),
        # the format is the majority's (unpaired), so line 3 is read as unpaired and said to differ
        (f"{path}:3", "other_format", "[unpaired] missing field 'completion' (record has: messages, label); "
                                      "the record looks like 'messages_label', but the data format is "
                                      "'unpaired' (2 of 3 records sampled; set data.format to choose)"),
    ]


def test_kto_fixture_balance(tokenizer):
    examples, report = load(KTO_20)
    assert report.format == "messages_label" and len(examples) == 20
    assert [e.label for e in examples].count(True) == 10
    assert all(e.prompt[-1]["role"] == "user" and e.completion[0]["role"] == "assistant"
               for e in examples)
    train, _ = prepare_datasets(DataConfig(max_length=512, max_prompt_length=256), tokenizer,
                                "unpaired", train_source=KTO_20)
    assert len(train) == 20
    assert train.report.counts["desirable"] == 10 and train.report.counts["undesirable"] == 10
    assert [e.label for e in train.examples] == [e.label for e in examples]
    assert all(set(e.completions) == {"completion"} for e in train.examples)


def test_kto_full_file_balance(shared_data, tokenizer):
    path = shared_data / "kto_en_demo.json"
    cfg = DataConfig(max_length=512, max_prompt_length=256)
    train, evaluation = prepare_datasets(cfg, tokenizer, "unpaired", train_source=path)
    assert evaluation is None
    assert train.report.format == "messages_label"
    assert train.report.records == 300 and len(train) == 300 and not train.report.rejected
    assert train.report.counts["desirable"] == 150 and train.report.counts["undesirable"] == 150


# ---------------------------------------------------------------------------- SFT formats
def test_prompt_completion_and_messages_formats(tmp_path):
    recs = [{"prompt": "Say hi:", "completion": " hi"},
            {"prompt": [user("Say hi")], "completion": assistant("hi")}]
    examples, report = load(write_jsonl(tmp_path / "pc.jsonl", recs))
    assert report.format == "prompt_completion"
    assert [(e.prompt, e.completion, e.label) for e in examples] == [
        ("Say hi:", " hi", None), ([user("Say hi")], [assistant("hi")], None)]

    recs = [{"messages": [system("S"), user("a"), assistant("b"), user("c"), assistant("d")]}]
    (ex,), report = load(write_jsonl(tmp_path / "m.jsonl", recs))
    assert report.format == "messages"
    assert (ex.prompt, ex.completion, ex.label) == (
        [system("S"), user("a"), assistant("b"), user("c")], [assistant("d")], None)

    recs = [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]
    (ex,), report = load(write_jsonl(tmp_path / "sg.jsonl", recs))
    assert report.format == "messages"
    assert (ex.prompt, ex.completion) == ([user("a")], [assistant("b")])


# ---------------------------------------------------------------------------- kind conversions
def _pairs() -> list[PreferenceExample]:
    return [PreferenceExample("p1", " c1", " r1", Origin("f", 0, 1), {"margin": 1.0}),
            PreferenceExample("p2", " c2", " r2", Origin("f", 1, 2))]


def test_as_kind_paired_to_completion_keeps_chosen():
    report = DataReport("train")
    out = as_kind(_pairs(), "completion", report)
    assert [(e.prompt, e.completion, e.label, e.origin.line, e.extras) for e in out] == [
        ("p1", " c1", None, 1, {"margin": 1.0}), ("p2", " c2", None, 2, {})]
    assert report.counts == {"pairs_used_for_chosen_only": 2}


def test_as_kind_paired_to_unpaired_gives_two_examples_per_pair():
    report = DataReport("train")
    out = as_kind(_pairs(), "unpaired", report)
    assert [(e.prompt, e.completion, e.label) for e in out] == [
        ("p1", " c1", True), ("p1", " r1", False), ("p2", " c2", True), ("p2", " r2", False)]
    assert report.counts == {"pairs_split_into_unpaired": 2}


def test_as_kind_unpaired_to_completion_drops_undesirable():
    exs = [CompletionExample("p", " good", Origin("f", 0, 1), True),
           CompletionExample("p", " bad", Origin("f", 1, 2), False),
           CompletionExample("p", " fine", Origin("f", 2, 3), True)]
    report = DataReport("train")
    out = as_kind(exs, "completion", report)
    assert [e.completion for e in out] == [" good", " fine"]
    assert report.counts == {"undesirable_not_used_for_sft": 1}
    assert as_kind(exs, "unpaired", DataReport("train")) == exs


def test_as_kind_completion_cannot_become_paired_or_unpaired():
    sft = [CompletionExample("p", " c", Origin("data.jsonl", 0, 3))]
    report = DataReport("train", format="prompt_completion")
    with pytest.raises(ConfigError) as err:
        as_kind(sft, "paired", report)
    assert str(err.value) == ("data.jsonl:3: the loss needs paired data (chosen and rejected), but the "
                              "data format 'prompt_completion' has one completion per example")
    with pytest.raises(ConfigError) as err:
        as_kind(sft, "unpaired", report)
    assert str(err.value).startswith("data.jsonl:3: the loss needs labelled completions")


def test_prepare_datasets_kind_conversions(demo_records, tokenizer, tmp_path):
    src = demo_records[:12]
    cfg = DataConfig(max_length=2048)
    sft, _ = prepare_datasets(cfg, tokenizer, "completion", train_source=src)
    assert len(sft) == 12 and sft.report.counts["pairs_used_for_chosen_only"] == 12
    paired, _ = prepare_datasets(cfg, tokenizer, "paired", train_source=src)
    assert [e.completions["completion"] for e in sft.examples] == [e.completions["chosen"]
                                                                   for e in paired.examples]
    kto, _ = prepare_datasets(cfg, tokenizer, "unpaired", train_source=src)
    assert len(kto) == 24 and kto.report.counts["pairs_split_into_unpaired"] == 12
    assert kto.report.counts["desirable"] == 12 and kto.report.counts["undesirable"] == 12
    assert [e.completions["completion"] for e in kto.examples[1::2]] == [e.completions["rejected"]
                                                                         for e in paired.examples]

    kto_file = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "q", "completion": " a", "label": i % 3 != 0}
                                                  for i in range(6)])
    sft, _ = prepare_datasets(cfg, tokenizer, "completion", train_source=kto_file)
    assert len(sft) == 4 and sft.report.counts["undesirable_not_used_for_sft"] == 2
    sft_file = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "completion": " a"}])
    with pytest.raises(ConfigError, match=r"s\.jsonl:1: the loss needs paired data"):
        prepare_datasets(cfg, tokenizer, "paired", train_source=sft_file)


# ---------------------------------------------------------------------------- data.columns
def test_columns_mapping(tmp_path):
    recs = [{"question": "Why?", "good": " Because.", "bad": " No.", "source": "x"}]
    path = write_jsonl(tmp_path / "q.jsonl", recs)
    (ex,), report = load(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert report.format == "plain"
    assert (ex.prompt, ex.chosen, ex.rejected) == ("Why?", " Because.", " No.")

    # without the mapping the record cannot be detected
    with pytest.raises(DataError, match="cannot detect the data format"):
        load(path)


def test_columns_mapping_missing_column_is_a_record_error(tmp_path):
    recs = [{"question": "Why?", "good": " a", "bad": " b"}, {"question": "How?", "good": " c"}]
    path = write_jsonl(tmp_path / "q.jsonl", recs)
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    examples, report = load(path, on_error="skip", columns=columns)
    assert len(examples) == 1 and report.rejected == {"missing_field": 1}
    assert report.rejects[0]["where"] == f"{path}:2"
    assert report.rejects[0]["problem"] == ("[plain] column 'bad' (mapped to 'rejected' by "
                                           "data.columns) is missing")
    with pytest.raises(DataError) as err:
        load(path, columns=columns)
    assert str(err.value).startswith(f"{path}:2: [plain] column 'bad' (mapped to 'rejected'")


def test_columns_mapping_also_applies_to_numeric_columns(tmp_path):
    recs = [{"prompt": "q", "chosen": " a", "rejected": " b", "gap": 2}]
    (ex,), _ = load(write_jsonl(tmp_path / "g.jsonl", recs), columns={"margin": "gap"})
    assert ex.extras == {"margin": 2.0}


# ---------------------------------------------------------------------------- file types
FIVE = [{"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"},
        {"prompt": "Say, \"hello\"", "chosen": " hello", "rejected": " bye"},
        {"prompt": "Two\nlines", "chosen": " ok\nthen", "rejected": " no"},
        {"prompt": "Unicode: café ☕", "chosen": " oui", "rejected": " non"},
        {"prompt": "Last one", "chosen": " yes", "rejected": " no"}]


def _write_all_types(tmp_path: Path) -> dict:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {}
    out["json"] = tmp_path / "d.json"
    out["json"].write_text(json.dumps(FIVE, indent=2, ensure_ascii=False), encoding="utf-8")
    out["jsonl"] = write_jsonl(tmp_path / "d.jsonl", FIVE)
    out["jsonl.gz"] = write_jsonl(tmp_path / "d.jsonl.gz", FIVE, opener=gzip.open)
    out["parquet"] = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(FIVE), out["parquet"])
    out["csv"] = tmp_path / "d.csv"
    with open(out["csv"], "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(FIVE)
    out["disk"] = tmp_path / "disk"
    datasets.Dataset.from_list(FIVE).save_to_disk(str(out["disk"]))
    out["Dataset"] = datasets.Dataset.from_list(FIVE)
    out["list"] = list(FIVE)
    return out


def test_all_file_types_give_identical_examples(tmp_path):
    expected = [(r["prompt"], r["chosen"], r["rejected"]) for r in FIVE]
    sources = _write_all_types(tmp_path)
    origins = {}
    for kind, source in sources.items():
        examples, report = load(source)
        assert report.format == "plain", kind
        assert triples(examples) == expected, kind
        origins[kind] = [str(e.origin) for e in examples]
    csv_lines = [2, 3, 4, 7, 8]  # the third row has two quoted multi-line fields: lines 4-6
    assert origins["csv"] == [f"{sources['csv']}:{n}" for n in csv_lines]
    assert origins["jsonl"] == [f"{sources['jsonl']}:{n}" for n in range(1, 6)]
    assert origins["jsonl.gz"] == [f"{sources['jsonl.gz']}:{n}" for n in range(1, 6)]
    assert origins["json"] == [f"{sources['json']}:{n}" for n in (2, 7, 12, 17, 22)]
    assert origins["parquet"] == [f"{sources['parquet']} record {n}" for n in range(1, 6)]
    assert origins["disk"] == [f"{sources['disk']} record {n}" for n in range(1, 6)]
    assert origins["Dataset"] == [f"<Dataset> record {n}" for n in range(1, 6)]
    assert origins["list"] == [f"<list> record {n}" for n in range(1, 6)]


def test_jsonl_line_numbers_skip_blank_lines(tmp_path):
    path = tmp_path / "b.jsonl"
    lines = ["", json.dumps(FIVE[0]), "", "   ", json.dumps(FIVE[1]), json.dumps(FIVE[2]), "", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    examples, report = load(path)
    assert report.records == 3
    assert [e.origin for e in examples] == [Origin(str(path), 0, 2), Origin(str(path), 1, 5),
                                            Origin(str(path), 2, 6)]


def test_jsonl_string_with_unicode_line_separator(tmp_path):
    """U+2028 is legal raw inside a JSON string; it must not split the record."""
    recs = [{"prompt": "a\u2028b\u0085c", "chosen": " x", "rejected": " y"}, FIVE[0]]
    path = tmp_path / "u.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n", encoding="utf-8")
    examples, report = load(path)
    assert examples[0].prompt == "a\u2028b\u0085c"
    assert [e.origin.line for e in examples] == [1, 2]


def test_json_array_origin_is_the_line_the_object_starts_on(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"prompt": "a", "chosen": " b", "rejected": " c"},\n'
                    '\n'
                    '  {"prompt": "d",\n'
                    '   "chosen": " e", "rejected": " f"}, {"prompt": "g", "chosen": " h", "rejected": " i"},\n'
                    ' {\n'
                    '  "prompt": "j", "chosen": " k", "rejected": " l"\n'
                    ' }\n'
                    ']\n', encoding="utf-8")
    examples, _ = load(path)
    assert [(e.prompt, e.origin.index, e.origin.line) for e in examples] == [
        ("a", 0, 1), ("d", 1, 3), ("g", 2, 4), ("j", 3, 5)]


def test_csv_rows_report_their_line(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('prompt,chosen,rejected\n'
                    'a, b, c\n'
                    '"multi\nline", d, e\n'
                    '\n'
                    'f, g, h\n'
                    'i, j\n', encoding="utf-8")
    examples, report = load(path, on_error="skip")
    assert [(e.prompt, e.origin.line) for e in examples] == [("a", 2), ("multi\nline", 3), ("f", 6)]
    # a short row: the missing field is reported at its line
    assert report.rejects[0]["where"] == f"{path}:7"
    assert report.rejects[0]["problem"] == "[plain] field 'rejected' is null"


def test_csv_with_a_byte_order_mark(tmp_path):
    """Excel writes CSV with a BOM; it must not become part of the first column name."""
    path = tmp_path / "excel.csv"
    path.write_text("prompt,chosen,rejected\nq, a, b\n", encoding="utf-8-sig")
    (ex,), report = load(path)
    assert report.format == "plain"
    assert (ex.prompt, ex.chosen, ex.rejected) == ("q", " a", " b")


def test_csv_numeric_columns(tmp_path):
    """CSV cells are text: a numeric loss column like margin is read as a number."""
    path = tmp_path / "m.csv"
    path.write_text("prompt,chosen,rejected,margin,score_chosen\nq, a, b,0.5,-2\nq, a, b,high,1\n")
    examples, report = load(path, on_error="skip")
    assert [e.extras for e in examples] == [{"margin": 0.5, "score_chosen": -2.0}]
    assert report.rejects[0]["where"] == f"{path}:3"
    assert report.rejects[0]["problem"] == "[plain] column 'margin' must be a finite number, got 'high'"


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError) as err:
        load(tmp_path / "nope.jsonl")
    assert str(err.value) == f"{tmp_path / 'nope.jsonl'}: no such file"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError) as err:
        load(empty)
    assert str(err.value) == f"{empty}: no records"


# ---------------------------------------------------------------------------- detection
def test_explicit_format_overrides_detection(tmp_path):
    recs = [{"prompt": "q", "completion": " a", "label": False}]
    path = write_jsonl(tmp_path / "u.jsonl", recs)
    (auto,), report = load(path)
    assert report.format == "unpaired" and auto.label is False
    (sft,), report = load(path, format="prompt_completion")
    assert report.format == "prompt_completion" and sft.label is None
    assert (sft.prompt, sft.completion) == ("q", " a")


def test_explicit_format_that_does_not_fit_is_reported_per_record(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", FIVE[:2])
    examples, report = load(path, on_error="skip", format="hh")
    assert examples == [] and report.rejected == {"wrong_type": 2}
    assert [(r["where"], r["problem"]) for r in report.rejects] == [
        (f"{path}:{n}", "[hh] chosen has no '\\n\\nAssistant:' turn") for n in (1, 2)]


def test_unknown_format_name():
    with pytest.raises(ConfigError) as err:
        load(FIVE, format="sharegtp")
    msg = str(err.value)
    assert msg.startswith("data.format: unknown data format 'sharegtp' (did you mean 'sharegpt'?); valid: ")
    for name in ("auto", "conversational", "conversational_implicit", "hh", "messages",
                 "messages_label", "plain", "prompt_completion", "sharegpt", "stack_exchange", "unpaired"):
        assert name in msg


def test_undetectable_record(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a", "score": 1}])
    with pytest.raises(DataError) as err:
        load(path, on_error="skip")  # detection failure stops even with skip
    assert err.value.where == f"{path}:1"
    msg = str(err.value)
    assert msg.startswith(f"{path}:1: cannot detect the data format from the keys "
                          f"['answer', 'question', 'score']; known formats: sharegpt (paired): ")
    assert "Set data.format, or map your columns with data.columns" in msg
    assert "{prompt: question, chosen: good, rejected: bad}" in msg


def test_detection_priority_is_registration_order():
    from prefopt.data.formats import FORMATS
    # the listwise formats come before the pair formats: a list of rejected texts is several rejected
    assert list(FORMATS) == ["sharegpt", "segment", "segment_turn", "stack_exchange", "hh", "plain_implicit",
                             "ranked", "multi_rejected",
                             "conversational", "conversational_implicit", "plain", "unpaired", "messages_label",
                             "prompt_completion", "messages", "text", "prompt_only"]


def test_detection_tie_goes_to_the_first_record(tmp_path):
    recs = [FIVE[0], {"question": "q", "response_j": "a", "response_k": "b"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", recs)
    examples, report = load(path, on_error="skip")
    assert report.format == "plain" and len(examples) == 1
    assert report.rejects[0]["where"] == f"{path}:2"
    assert report.rejects[0]["reason"] == "other_format"
    assert report.rejects[0]["problem"] == ("[plain] missing field 'prompt' (record has: question, "
                                           "response_j, response_k); the record looks like 'stack_exchange', "
                                           "but the data format is 'plain' (1 of 2 records sampled; set "
                                           "data.format to choose)")


# The format is the majority's over the first SAMPLE_SIZE readable records, so one odd record at
# the top of a file is one rejected record, not a failed run or a misread file.
def test_first_record_missing_a_field_does_not_decide_the_format(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": " a"}] + FIVE)
    examples, report = load(path, on_error="skip")
    assert report.format == "plain" and triples(examples) == triples(load(write_jsonl(tmp_path / "5.jsonl", FIVE))[0])
    assert (report.records, dict(report.rejected)) == (6, {"missing_field": 1})
    assert report.rejects[0]["where"] == f"{path}:1"
    assert report.notes == ["data format 'plain' detected from 5 of 6 records sampled (also seen: 1 of no known "
                            "format); records that do not fit it are rejected at their line"]
    with pytest.raises(DataError) as err:
        load(path)
    assert str(err.value) == (f"{path}:1: [plain] missing field 'rejected' (record has: prompt, chosen) "
                              f"(set data.on_error: skip to skip such records)")


def test_stray_record_of_another_format_is_rejected_at_its_line(tmp_path, tokenizer):
    stray = {"prompt": "Hi", "completion": " there"}
    path = write_jsonl(tmp_path / "p.jsonl", [stray] + FIVE)
    train, _ = prepare_datasets(DataConfig(max_length=64, on_error="skip"), tokenizer, "paired", train_source=path)
    assert (train.report.format, train.report.records, train.report.examples) == ("plain", 6, 5)
    assert dict(train.report.rejected) == {"other_format": 1}
    problem = ("[plain] missing field 'chosen' (record has: prompt, completion); the record looks like "
               "'prompt_completion', but the data format is 'plain' (5 of 6 records sampled; set data.format "
               "to choose)")
    assert (train.report.rejects[0]["where"], train.report.rejects[0]["problem"]) == (f"{path}:1", problem)
    with pytest.raises(DataError) as err:
        load(path)
    assert str(err.value) == f"{path}:1: {problem} (set data.on_error: skip to skip such records)"
    # data.format still decides alone: no vote, so no comparison in the message
    examples, report = load(path, on_error="skip", format="plain")
    assert len(examples) == 5 and report.rejected == {"missing_field": 1} and not report.notes


def test_format_is_voted_by_the_first_100_readable_records(tmp_path):
    from prefopt.data.formats import SAMPLE_SIZE
    sft = [{"prompt": f"q{i}", "completion": " a"} for i in range(SAMPLE_SIZE)]
    lines = ["not json"] * 3 + [json.dumps(r) for r in sft + FIVE * 30]  # 150 plain after the sample
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    examples, report = load(path, on_error="skip")
    assert report.format == "prompt_completion" and len(examples) == SAMPLE_SIZE
    assert report.records == 253 and dict(report.rejected) == {"malformed": 3, "other_format": 150}
    assert not report.notes  # the sample was unanimous
    assert [r["where"] for r in report.rejects[:4]] == [f"{path}:{n}" for n in (1, 2, 3, 104)]


def test_max_examples(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", FIVE)
    examples, report = load(path, max_examples=2)
    assert [e.prompt for e in examples] == [FIVE[0]["prompt"], FIVE[1]["prompt"]]
    assert report.records == 2 and report.counts == {"records_beyond_max_examples": 3}


def test_pretty_printed_single_object_json_is_one_record(tmp_path):
    path = tmp_path / "one.json"
    path.write_text('\n{\n  "prompt": "Hi",\n  "chosen": " yes",\n  "rejected": " no"\n}\n')
    examples, report = load(path)
    assert [(e.prompt, e.chosen, str(e.origin)) for e in examples] == [("Hi", " yes", f"{path}:2")]


def test_csv_labels_and_empty_numeric_cells(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text("prompt,completion,label,margin\nq, a,1,\nq, b,0,0.5\n")
    examples, report = load(path)
    assert [(e.completion, e.label, e.extras) for e in examples] == [(" a", True, {}), (" b", False, {"margin": 0.5})]


def test_columns_no_loss_reads_are_neither_extracted_nor_validated(tmp_path):
    recs = [{"prompt": "q", "chosen": " a", "rejected": " b", "margin": "not a number", "preference_prob": 0.7}]
    path = write_jsonl(tmp_path / "m.jsonl", recs)
    report = DataReport("train", "raise")
    (ex,) = load_examples(path, DataConfig(), report)  # e.g. plain DPO: reads no column
    assert ex.extras == {}
    (ex,) = load_examples(path, DataConfig(), report, required_columns=("preference_prob",))
    assert ex.extras == {"preference_prob": 0.7}
    with pytest.raises(DataError, match="column 'margin' must be a finite number"):
        load_examples(path, DataConfig(), report, required_columns=("margin",))


def test_a_folder_of_data_files_loads_through_the_hub_code_path(tmp_path):
    """datasets.load_dataset(<folder>) is the same call as for a hub id: tested offline."""
    repo = tmp_path / "org__pairs"
    (repo / "data").mkdir(parents=True)
    write_jsonl(repo / "data" / "train.jsonl", FIVE[:3])
    write_jsonl(repo / "data" / "test.jsonl", FIVE[3:])
    examples, _ = load(repo)
    assert triples(examples) == [(r["prompt"], r["chosen"], r["rejected"]) for r in FIVE[:3]]
    examples, _ = load(repo, split="test")
    assert [e.prompt for e in examples] == ["Unicode: café ☕", "Last one"]
    assert str(examples[0].origin) == f"{repo}[test] record 1"
