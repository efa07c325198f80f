"""The tokenised-data cache: a second run on the same data, tokenizer and settings reads the
examples back (equal to a fresh tokenisation, report and rejects included) instead of
tokenising; any change of content, tokenizer or setting is another key."""
import json

import pytest

from prefopt import DPOConfig, DPOTrainer
from prefopt.data import pipeline

SHORT = dict(max_length=64, max_prompt_length=32, logging_steps=1, progress_bar=False, per_device_train_batch_size=2)


def examples_of(trainer):
    return [(e.prompt_ids, e.completions, str(e.origin)) for e in trainer._train_set.examples]


def test_a_second_run_reads_the_tokenised_examples_back(tiny_model_dir, demo_records, tmp_path, monkeypatch, caplog):
    data = tmp_path / "pairs.jsonl"
    records = demo_records[:10]
    data.write_text("".join(json.dumps(r) + "\n" for r in records) + "{not json\n")  # one bad line, skipped
    calls = []
    real = pipeline.encode
    monkeypatch.setattr(pipeline, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = {"data.train": str(data), "on_error": "skip", "cache_dir": str(tmp_path / "cache"), **SHORT}

    def setup(out, **keys):
        trainer = DPOTrainer(str(tiny_model_dir), None, args=DPOConfig(output_dir=str(tmp_path / out),
                                                                       **{**common, **keys}))
        trainer.setup()
        return trainer

    first = setup("a")
    assert len(calls) == 1
    caplog.set_level("INFO", logger="prefopt")
    second = setup("b")
    assert len(calls) == 1, "the second run tokenised again"
    assert "read from the cache" in caplog.text
    assert examples_of(second) == examples_of(first) and len(examples_of(first)) == 10
    assert (tmp_path / "b" / "data_report.json").read_text() == (tmp_path / "a" / "data_report.json").read_text()
    assert (tmp_path / "b" / "rejected_records.jsonl").read_text() == \
        (tmp_path / "a" / "rejected_records.jsonl").read_text() != ""
    # another setting, another tokenisation; the same settings with the cache off tokenise too
    setup("c", max_length=48)
    assert len(calls) == 2
    setup("d", **{"data.cache": False})
    assert len(calls) == 3
    # changed content under the same file name is another key
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:9]))
    assert len(examples_of(setup("e"))) == 9 and len(calls) == 4
    folders = [p for p in (tmp_path / "cache").iterdir()]
    assert len(folders) == 3 and not [p for p in folders if p.name.startswith(".tmp")]


def test_records_passed_in_python_are_cached_by_content(tiny_model_dir, demo_records, tmp_path, monkeypatch):
    calls = []
    real = pipeline.encode
    monkeypatch.setattr(pipeline, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    for out in ("a", "b"):
        DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:6],
                   args=DPOConfig(output_dir=str(tmp_path / out), cache_dir=str(tmp_path / "cache"), **SHORT)).setup()
    assert len(calls) == 1


def test_the_key_is_stable_for_record_checks_that_are_partials():
    import functools

    from prefopt.data.cache import check_name

    def needs(columns, p):
        return None

    a, b = functools.partial(needs, p=1), functools.partial(needs, p=1)
    assert check_name(a) == check_name(b) and "0x" not in check_name(a)
    assert check_name(functools.partial(needs, p=2)) != check_name(a)
