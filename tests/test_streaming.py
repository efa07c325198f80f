"""data.streaming: data larger than memory, read and encoded as training consumes it.

A pass over the stream yields exactly the examples (and the report) of the in-memory path; the
shares of the processes are disjoint and cover the file; the order is a function of (seed, pass);
training holds no more than the shuffle buffer and resumes bit-exactly; what streaming cannot do
is a clear error; and JSON Lines are read lazily.
"""
import gzip
import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt.config import load_config
from prefopt.data.pipeline import prepare_datasets
from prefopt.data.roles import expand_roles
from prefopt.data.sources import read_records
from prefopt.data.stream import StreamedData
from prefopt.data.tokenize import Encoder
from prefopt.errors import ConfigError, DataError
from prefopt.trainer import Trainer

BAD = ['{"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Yes"}}',
       "{not json", '{"conversations": [], "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}']


def jsonl(records: list[dict], path: Path, bad_every: int = 0) -> Path:
    """The records as JSON Lines; with ``bad_every``, a bad line after every n-th record."""
    lines = []
    for i, r in enumerate(records):
        lines.append(json.dumps(r))
        if bad_every and i % bad_every == bad_every - 1:
            lines.append(BAD[(i // bad_every) % len(BAD)])
    path.write_text("\n".join(lines) + "\n")
    return path


def data_config(path: Path, **extra):
    return load_config(None, [f"data.train={path}", "data.on_error=skip", "data.max_length=64",
                              "data.max_prompt_length=32", *[f"data.{k}={v}" for k, v in extra.items()]]).data


def streamed(path, tokenizer, kind="paired", roles=("chosen", "rejected"), process=0, processes=1, **extra):
    cfg = data_config(path, **extra)
    encoder = Encoder(tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.prompt_truncation, cfg.truncation)
    return StreamedData(path, cfg, encoder, kind, ((), (), ()), roles, seed=0, process_index=process,
                        num_processes=processes)


def in_memory(path, tokenizer, kind="paired", roles=("chosen", "rejected")):
    train, _ = prepare_datasets(data_config(path), tokenizer, kind)
    return expand_roles(train.examples, roles), train.report


def same(a, b) -> bool:
    return (a.uid, a.prompt_ids, a.completions, a.scored) == (b.uid, b.prompt_ids, b.completions, b.scored)


def test_a_pass_yields_the_in_memory_examples_and_report(tokenizer, demo_records, tmp_path):
    path = jsonl(demo_records[:30], tmp_path / "d.jsonl", bad_every=7)
    expected, report = in_memory(path, tokenizer)
    data = streamed(path, tokenizer, shuffle_buffer=1)  # a buffer of one: file order
    got = list(data.examples(0))
    assert len(got) == len(expected) == 30 and all(same(a, b) for a, b in zip(got, expected))
    mine, theirs = data.report.as_dict(), report.as_dict()
    assert mine == theirs and mine["records"] == 34 and mine["examples"] == 30
    assert mine["rejected"] == {"other_format": 2, "malformed": 1, "empty": 1}
    assert [r["where"] for r in data.report.rejects] == [r["where"] for r in report.rejects]


def test_shares_of_two_processes_are_disjoint_and_cover_every_record(tokenizer, demo_records, tmp_path):
    path = jsonl(demo_records[:25], tmp_path / "d.jsonl", bad_every=6)
    expected, report = in_memory(path, tokenizer)
    shares = [streamed(path, tokenizer, process=p, processes=2, shuffle_buffer=4) for p in (0, 1)]
    got = [list(s.examples(0)) for s in shares]
    assert len(got[0]) == 13 and len(got[1]) == 12  # records 0, 2, 4, ... of the file and 1, 3, 5, ...
    assert sorted(e.uid for share in got for e in share) == sorted(e.uid for e in expected)
    assert sum(s.report.records for s in shares) == report.records == 29
    assert sum(sum(s.report.rejected.values()) for s in shares) == sum(report.rejected.values()) == 4


def test_kto_mismatched_pairs_are_the_next_example_of_the_share(tokenizer, tmp_path):
    records = [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 2 == 0} for i in range(7)]
    path = jsonl(records, tmp_path / "kto.jsonl")
    roles = ("completion", "kl")
    expected, _ = in_memory(path, tokenizer, "unpaired", roles)
    got = list(streamed(path, tokenizer, "unpaired", roles, shuffle_buffer=1).examples(0))
    assert all(same(a, b) for a, b in zip(got, expected)) and len(got) == 7
    assert got[-1].completions["kl"] == got[0].completions["completion"]


def test_the_order_is_a_function_of_seed_and_pass_and_the_buffer_bounds_it(tokenizer, demo_records, tmp_path):
    path = jsonl(demo_records[:40], tmp_path / "d.jsonl")
    data = streamed(path, tokenizer, shuffle_buffer=8)
    first, again, second = ([e.uid for e in data.examples(p)] for p in (0, 0, 1))
    file_order = [e.uid for e in in_memory(path, tokenizer)[0]]
    assert first == again and first != second and sorted(first) == sorted(second) == sorted(file_order)
    # a buffer of 8: the k-th example out is one of the first k + 8 of the file
    assert all(file_order.index(uid) < k + 8 for k, uid in enumerate(first))


def stream_run(model_dir: Path, data: Path, out: Path, **extra) -> Trainer:
    cfg = load_config(None, [f"model.name_or_path={model_dir}", f"data.train={data}", f"output_dir={out}",
                             "data.streaming=true", "data.shuffle_buffer=8", "data.max_length=64",
                             "data.max_prompt_length=32", "train.max_steps=6", "train.save_steps=3",
                             "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2",
                             "train.learning_rate=5e-3", "train.progress_bar=false", "train.logging_steps=1",
                             *[f"{k}={v}" for k, v in extra.items()]])
    trainer = Trainer.from_config(cfg)
    trainer.train()
    return trainer


def test_streamed_training_is_lazy_crosses_passes_and_resumes_exactly(tiny_model_dir, demo_records, tmp_path):
    path = jsonl(demo_records[:10], tmp_path / "d.jsonl")  # 10 pairs: 5 micro-batches of 2 per pass
    full = stream_run(tiny_model_dir, path, tmp_path / "full")
    # 6 steps x 2 micro-batches x 2 pairs = 24 pairs read: 2 passes and 4 pairs of a third
    assert full.train_state.epoch == 2 and full.train_state.batch_in_epoch == 2
    assert full._train_set.encoded == 30  # whole passes are encoded (shuffled through the buffer)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    report = json.loads((tmp_path / "full" / "data_report.json").read_text())
    assert report[0]["dataset"] == "train" and report[0]["records"] == 10 and report[0]["examples"] == 10
    resumed = stream_run(tiny_model_dir, path, tmp_path / "resumed",
                         **{"train.resume_from": str(tmp_path / "full" / "checkpoints" / "step-3")})
    assert resumed.train_state.step == 6
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_large_stream_is_never_held_whole(tiny_model_dir, demo_records, tmp_path):
    path = jsonl(demo_records * 10, tmp_path / "big.jsonl")  # 600 pairs; 2 steps read 8
    trainer = stream_run(tiny_model_dir, path, tmp_path / "run", **{"train.max_steps": 2, "train.save_steps": 0})
    # the 8 pairs trained on, the buffer of 8, and the micro-batch read ahead to tell a pass's end
    assert trainer._train_set.encoded <= 8 + 8 + 2
    (report,) = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["records"] == trainer._train_set.encoded and any(
        f"the counts cover the {report['records']} records read" in note for note in report["notes"])


def test_shares_count_the_records_beyond_max_examples_once(tokenizer, demo_records, tmp_path):
    path = jsonl(demo_records[:20], tmp_path / "d.jsonl")
    shares = [streamed(path, tokenizer, process=p, processes=2, max_examples=8) for p in (0, 1)]
    for share in shares:
        list(share.examples(0))
    assert [s.report.records for s in shares] == [4, 4]
    assert sum(s.report.counts["records_beyond_max_examples"] for s in shares) == 12


def test_a_resume_past_the_end_of_a_pass_says_the_data_changed(tokenizer, demo_records, tmp_path):
    from prefopt.data.collate import Collator
    from prefopt.data.stream import StreamLoader

    data = streamed(jsonl(demo_records[:6], tmp_path / "d.jsonl"), tokenizer, shuffle_buffer=2)
    loader = StreamLoader(data, Collator("padded", tokenizer.pad_token_id, ("chosen", "rejected")), 2, "cpu")
    assert len(list(itertools.islice(loader.from_position(0, 2), 3))) == 3  # micro-batch 2 of 3, then pass 1
    with pytest.raises(ConfigError, match=r"micro-batch 3 of pass 0\) is past the end of that pass \(3 micro"):
        next(loader.from_position(0, 3))


@pytest.mark.parametrize("extra, message", [
    ({"train.max_steps": 0}, "set train.max_steps"),
    ({"data.eval_split_size": 4}, "data.streaming with data.eval_split_size: a held-out share needs the whole data"),
    ({"reference.strategy": "precomputed"}, "the pre-pass reads the whole data"),
    ({"train.save_strategy": "epoch"}, "train.save_strategy=epoch"),
    ({"data.num_proc": 2}, "data.num_proc"),
    ({"data.group_by_length": "true"}, "data.group_by_length"),
])
def test_what_streaming_cannot_do_is_a_clear_error(tiny_model_dir, demo_records, tmp_path, extra, message):
    path = jsonl(demo_records[:10], tmp_path / "d.jsonl")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        stream_run(tiny_model_dir, path, tmp_path / "run", **extra)


def test_json_lines_are_read_lazily(tmp_path):
    """A truncated .jsonl.gz gives its whole records first, then the error: the file is read as
    it is consumed, not whole before the first record."""
    lines = "".join(json.dumps({"prompt": f"p{i}", "completion": "c", "label": True}) + "\n" for i in range(2000))
    whole = gzip.compress(lines.encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[:len(whole) // 2])
    records = read_records(path)
    first = [next(records) for _ in range(3)]
    assert [r.data["prompt"] for r in first] == ["p0", "p1", "p2"] and first[2].origin.line == 3
    with pytest.raises(DataError, match="cannot read file"):
        list(records)


def test_crlf_and_bom_read_line_by_line_as_before(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a", "completion": "b", "label": true}\r\n\r\n'
                     + b'{"prompt": "c", "completion": "d", "label": false}\r{"prompt": "e"\r\n')
    got = list(read_records(path))
    assert [(r.origin.line, r.data and r.data["prompt"]) for r in got] == [(1, "a"), (3, "c"), (4, None)]
    assert "malformed JSON" in got[2].problem
