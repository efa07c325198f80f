"""data.num_proc (TRL's dataset_num_proc): tokenising in several processes gives the same
examples, in the same order, and the same report (counts, rejects, first-occurrence notes) as
one process; in raise mode the error is the earliest bad record's."""
import json

import pytest

from prefopt.config import DataConfig
from prefopt.data.pipeline import prepare_datasets
from prefopt.errors import DataError


def corpus(records, path):
    rows = [dict(r) for r in records[:9]]
    rows[2]["chosen"] = dict(rows[2]["chosen"], value="a NUL\x00 here")
    rows[6]["rejected"] = dict(rows[6]["rejected"], value="and\x00 another")
    rows[4] = {"conversations": rows[4]["conversations"]}  # no chosen/rejected: a bad record
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepared(tokenizer, path, num_proc, on_error="skip"):
    cfg = DataConfig(train=str(path), max_length=64, max_prompt_length=32, on_error=on_error, num_proc=num_proc,
                     cache=False)
    train, _ = prepare_datasets(cfg, tokenizer, "paired")
    return train


def test_several_processes_tokenise_as_one(tokenizer, demo_records, tmp_path):
    path = corpus(demo_records, tmp_path / "d.jsonl")
    one, three = prepared(tokenizer, path, 1), prepared(tokenizer, path, 3)
    assert [(e.prompt_ids, e.completions, str(e.origin)) for e in three.examples] == \
           [(e.prompt_ids, e.completions, str(e.origin)) for e in one.examples]
    assert len(one.examples) == 8
    assert three.report.as_dict() == one.report.as_dict()
    assert three.report.rejects == one.report.rejects
    assert one.report.counts["contains_nul"] == 2
    assert [n for n in one.report.notes if "NUL" in n] == [n for n in three.report.notes if "NUL" in n]
    assert len([n for n in three.report.notes if "NUL" in n]) == 1


def test_raise_mode_stops_at_the_earliest_bad_record(tokenizer, demo_records, tmp_path):
    rows = [dict(r) for r in demo_records if len(json.dumps(r)) < 1500][:9]
    for i in (3, 7):  # prompts far beyond max_length under strict truncation: bad records in two chunks
        rows[i]["conversations"] = [{"from": "human", "value": "word " * 1100}]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = dict(train=str(path), max_length=1024, on_error="raise", cache=False, truncation="strict")
    for num_proc in (1, 3):
        with pytest.raises(DataError, match=r"long.jsonl:4: the prompt has"):
            prepare_datasets(DataConfig(num_proc=num_proc, **cfg), tokenizer, "paired")
