"""The console (prefopt.console): quiet for quick phases, a periodic and a final line for slow ones in
a log, the eval table with the real values, the end-of-run summary, the step line's fields."""
import io
import json
import re
import threading

import pytest

from prefopt import DPOConfig, DPOTrainer, console
from prefopt.config import DataConfig
from prefopt.data.pipeline import prepare_datasets


class FakeClock:
    """console.clock, advanced by hand: slow phases without sleeping."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch, caplog):
    fake = FakeClock()
    monkeypatch.setattr(console, "clock", fake)
    monkeypatch.setattr(console, "interactive", lambda: False)  # a log, whatever runs the tests
    console.configure(progress=True, main=True)
    caplog.set_level("INFO", logger="prefopt")
    yield fake
    console.configure()


def test_a_quick_phase_prints_nothing(clock, caplog):
    with console.phase("tokenising train", total=100, unit="example") as tick:
        for _ in range(100):
            clock.now += 0.04  # 4 s in all: under console.QUIET
            tick()
    assert caplog.messages == []


def test_a_slow_phase_prints_periodic_lines_and_a_final_count(clock, caplog):
    with console.phase("tokenising train", total=300, unit="example") as tick:
        for _ in range(300):
            clock.now += 0.1  # 30 s in all
            tick()
    *periodic, final = caplog.messages
    assert final == "tokenising train: 300 examples in 30.0s (10 examples/s)"
    # one line per console.EVERY seconds, not one per tick: at 10 s and 20 s (and 30 s)
    assert 2 <= len(periodic) <= 3
    assert periodic[0] == "tokenising train: 100/300 examples (33%), 0:00:10, ETA 0:00:20"


def test_progress_counts_the_items_and_says_nothing_when_quiet_or_not_main(clock, caplog):
    def slow_items(n):
        for i in range(n):
            clock.now += 2.0
            yield i

    assert list(console.progress(slow_items(4), "evaluating", total=4, unit="batch")) == [0, 1, 2, 3]
    assert caplog.messages == ["evaluating: 4 batches in 8.0s (0.5 batches/s)"]
    caplog.clear()
    for settings in (dict(progress=False, main=True), dict(progress=True, main=False)):
        console.configure(**settings)
        assert list(console.progress(slow_items(4), "evaluating", unit="batch")) == [0, 1, 2, 3]
    assert caplog.messages == []


def test_a_phase_that_fails_has_no_final_line(clock, caplog):
    with pytest.raises(ValueError):
        with console.phase("saving checkpoint x"):
            clock.now += 60
            raise ValueError("disk full")
    assert caplog.messages == []


def test_a_phase_without_ticks_says_it_is_still_going(monkeypatch, clock, caplog):
    monkeypatch.setattr(console, "EVERY", 0.01)
    done = threading.Event()
    with console.phase("saving the model to runs/x/final"):
        clock.now += 12
        done.wait(0.2)  # the helper thread wakes every EVERY seconds
    assert any(m == "saving the model to runs/x/final... 0:00:12" for m in caplog.messages)
    assert caplog.messages[-1] == "saving the model to runs/x/final: done in 12.0s"


def test_tokenising_reports_its_count_when_slow(tokenizer, demo_records, tmp_path, clock, caplog, monkeypatch):
    monkeypatch.setattr(console, "QUIET", 0.0)  # every phase counts as slow
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo_records[:7]))
    prepare_datasets(DataConfig(train=str(path), max_length=64, max_prompt_length=32, cache=False), tokenizer, "paired")
    assert caplog.messages[-1].startswith("tokenising train: 7 examples in ")


EVAL = {"eval/loss": 0.693147, "eval/rewards/accuracies": 0.75, "eval/rewards/margins": 0.0123,
        "eval/rewards/chosen": -0.5, "eval/rewards/rejected": -0.5123, "eval/logps/chosen": -123.456,
        "eval/logps/rejected": -130.25, "eval/logits/chosen": 1.0}


def test_the_eval_table_holds_the_values_aligned_under_their_names():
    head, row = console.eval_lines(4, {**EVAL, "eval/mean_token_accuracy": 0.1}, 1.25)
    assert head.startswith("eval at step 4 (1.2s): loss ")
    names = head.split(": ", 1)[1].split()
    assert names == ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                     "logps/chosen", "logps/rejected"]  # the key metrics, not every one
    assert row.split() == ["0.6931", "0.75", "0.0123", "-0.5", "-0.5123", "-123.5", "-130.2"]
    for name in names:  # each value starts under its name
        assert row[head.index(" " + name + " " if name != names[-1] else " " + name) + 1] != " "
    sft_head, sft_row = console.eval_lines(2, {"eval/loss": 2.5, "eval/mean_token_accuracy": 0.41}, 0.5)
    assert sft_head.split(": ", 1)[1].split() == ["loss", "mean_token_accuracy"] and sft_row.split() == ["2.5", "0.41"]


def test_the_rich_eval_table_is_compact():
    out = io.StringIO()
    console.eval_table(4, EVAL, 1.25, file=out)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert len(lines) <= 4, lines
    assert "eval at step 4" in lines[0] and "reward acc" in lines[1] and "logp rejected" in lines[1]
    assert max(len(line.rstrip()) for line in lines) <= 80
    assert "0.6931" in lines[-1] and "-123.5" in lines[-1]


def test_the_training_bar_has_the_fields_of_the_plain_line():
    fields = console.postfix({"loss": 0.6931, "rewards/accuracies": 0.5, "grad_norm": 1.234, "tokens_per_second": 812.4,
                              "learning_rate": 1e-5})
    assert fields == {"loss": "0.6931", "acc": "0.5", "gnorm": "1.234", "tok/s": "812"}


def test_a_run_prints_step_lines_an_eval_table_and_one_summary(tiny_model_dir, demo_records, tmp_path, caplog,
                                                               monkeypatch):
    monkeypatch.setattr(console, "interactive", lambda: False)
    caplog.set_level("INFO", logger="prefopt")
    out = tmp_path / "run"
    DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:4], eval_dataset=demo_records[4:6],
               args=DPOConfig(output_dir=str(out), max_steps=2, logging_steps=1, save_steps=1, max_length=64,
                              max_prompt_length=32, per_device_train_batch_size=2, progress_bar=True)).train()
    messages = caplog.messages
    steps = [m for m in messages if m.startswith("step ")]
    assert len(steps) == 2
    for m in steps:
        assert re.search(r"^step \d/2 loss [0-9.]+ rewards/accuracies [0-9.]+ grad norm [0-9.e+-]+ lr [0-9.e+-]+, "
                         r"\d+ tokens/s, batch fill [0-9.]+, ETA \d+:\d\d:\d\d$", m), m
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in rows if "eval/loss" in r][-1]
    heads = [i for i, m in enumerate(messages) if m.startswith("eval at step 2 ")]
    assert len(heads) == 1
    head, row = messages[heads[0]], messages[heads[0] + 1]
    assert "loss" in head and "rewards/accuracies" in head
    assert row.split()[:2] == [f"{last_eval['eval/loss']:.4g}", f"{last_eval['eval/rewards/accuracies']:.4g}"]
    summaries = [m for m in messages if m.startswith("done: ")]
    assert len(summaries) == 1 and messages[-1] == summaries[0]
    summary = summaries[0]
    final_loss = [r for r in rows if "loss" in r][-1]["loss"]
    assert summary.startswith("done: 2 steps in 0:0")
    assert "(0 skipped)" in summary and f"final loss {final_loss:.4g}" in summary
    assert f"eval accuracy {last_eval['eval/rewards/accuracies']:.4g}" in summary
    assert f"outputs: {out / 'final'} (model), metrics.jsonl" in summary and "checkpoints/ (2)" in summary
