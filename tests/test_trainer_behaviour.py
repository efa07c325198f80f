"""Trainer and loop behaviours found in review: each test pins one bug that existed."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefopt import DPOConfig, DPOTrainer
from prefopt.errors import ConfigError, DataError
from prefopt.train.batches import EvalBatchSampler

SHORT = dict(max_length=64, max_prompt_length=32, logging_steps=1, progress_bar=False)


def make(tiny_model_dir, data, out, **kw):
    trainer_kw = {k: kw.pop(k) for k in ("loss", "beta", "eval_dataset") if k in kw}
    return DPOTrainer(str(tiny_model_dir), None, train_dataset=data, args=DPOConfig(output_dir=str(out), **{**SHORT, **kw}),
                      **trainer_kw)


def steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_loss_keywords_merge_into_an_explicit_loss_and_typos_fail(tiny_model_dir, demo_records, tmp_path):
    t = make(tiny_model_dir, demo_records[:4], tmp_path, loss="ipo", beta=0.5)
    assert t.config.loss[0].name == "ipo" and t.config.loss[0].params["beta"] == 0.5
    with pytest.raises(ConfigError, match="did you mean 'beta'"):
        DPOTrainer(str(tiny_model_dir), None, loss="ipo", betta=0.5, args=DPOConfig(output_dir=str(tmp_path)))


def test_the_users_config_is_never_modified(tiny_model_dir, demo_records, tmp_path):
    config = DPOConfig(output_dir=str(tmp_path), max_steps=1, **SHORT)
    t = DPOTrainer(str(tiny_model_dir), None, beta=0.5, train_dataset=demo_records[:4], args=config)
    t.setup()
    assert config.loss[0].params["beta"] == 0.1 and config.model.name_or_path is None
    assert t.config.loss[0].params["beta"] == 0.5 and t.config.model.name_or_path == str(tiny_model_dir)


def test_train_runs_once_and_needs_training_data(tiny_model_dir, demo_records, tmp_path):
    t = make(tiny_model_dir, demo_records[:4], tmp_path, max_steps=1)
    t.train()
    with pytest.raises(ConfigError, match="already trained"):
        t.train()
    only_eval = DPOTrainer(str(tiny_model_dir), None, eval_dataset=demo_records[:4],
                           args=DPOConfig(output_dir=str(tmp_path / "e"), **SHORT))
    assert "eval_loss" in only_eval.evaluate()
    with pytest.raises(ConfigError, match="no training data"):
        only_eval.train()


def test_the_policy_cannot_be_its_own_reference(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match="ref_model is the policy itself"):
        DPOTrainer(model, model, args=DPOConfig(output_dir=str(tmp_path)))


def test_save_model_to_a_path(tiny_model_dir, demo_records, tmp_path):
    t = make(tiny_model_dir, demo_records[:4], tmp_path / "run", max_steps=1)
    t.train()
    saved = t.save_model(tmp_path / "elsewhere")
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    for (name, a), b in zip(t.model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_resuming_a_finished_run_trains_nothing_more(tiny_model_dir, demo_records, tmp_path):
    common = dict(max_steps=2, per_device_train_batch_size=2, lr_scheduler_type="constant", learning_rate=1e-3)
    make(tiny_model_dir, demo_records[:4], tmp_path, save_steps=2, **common).train()
    before = (tmp_path / "final" / "model.safetensors").read_bytes()
    t = make(tiny_model_dir, demo_records[:4], tmp_path, resume_from="latest", **common)
    t.train()
    assert t.train_state.step == t.state.global_step == 2 and steps(tmp_path) == [1, 2]
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == before


def test_resume_drops_metrics_logged_after_the_checkpoint(tiny_model_dir, demo_records, tmp_path):
    common = dict(max_steps=4, per_device_train_batch_size=2)
    make(tiny_model_dir, demo_records[:8], tmp_path, save_steps=2, **common).train()
    assert steps(tmp_path) == [1, 2, 3, 4]
    make(tiny_model_dir, demo_records[:8], tmp_path, resume_from=str(tmp_path / "checkpoints" / "step-2"),
         **common).train()
    assert steps(tmp_path) == [1, 2, 3, 4]  # 3 and 4 once each, from the resumed run


def test_dropout_is_off_so_the_first_dpo_loss_is_ln2(tokenizer, demo_records, tmp_path):
    from prefopt.models import build_tiny_model, save_pretrained

    gpt2 = build_tiny_model(len(tokenizer), arch="gpt2", hidden_size=32, layers=2, heads=4, max_positions=128)
    assert gpt2.config.resid_pdrop == 0.1
    path = save_pretrained(gpt2, tokenizer, tmp_path / "gpt2")
    make(path, demo_records[:4], tmp_path / "run", max_steps=1, per_device_train_batch_size=4).train()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_chat_template_errors_are_record_problems(tiny_model_dir, demo_records, tmp_path):
    from prefopt.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "{{ m['content'] }}{% endfor %}")
    with_system = next(i for i, r in enumerate(demo_records) if r["conversations"][0]["from"] == "system")
    data = [demo_records[0], demo_records[with_system]]
    t = DPOTrainer(str(tiny_model_dir), None, train_dataset=data, tokenizer=tok,
                   args=DPOConfig(output_dir=str(tmp_path), on_error="skip", max_steps=1, **SHORT))
    t.setup()
    assert dict(t._train_set.report.rejected) == {"template": 1}
    assert "System role not supported" in t._train_set.report.rejects[0]["problem"]


@pytest.mark.parametrize("override, message", [({"max_prompt_length": 0}, "max_prompt_length >= 1"),
                                              ({"max_length": 1, "max_prompt_length": None}, "max_length must be >= 2")])
def test_length_limits_are_validated(tiny_model_dir, demo_records, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        make(tiny_model_dir, demo_records[:4], tmp_path, **{**override}).setup()


def test_non_finite_columns_are_bad_records(tiny_model_dir, tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"prompt": "q", "chosen": " a", "rejected": " b", "margin": NaN}\n')
    with pytest.raises(DataError, match=r"m.jsonl:1: .*'margin' must be a finite number"):
        make(tiny_model_dir, str(path), tmp_path / "o", loss={"name": "odpo", "offset": "margin"}).setup()


@pytest.mark.parametrize("n, size, processes", [(10, 4, 2), (10, 4, 3), (3, 4, 2), (9, 2, 4), (7, 3, 1)])
def test_eval_batches_count_every_example_once_and_even_out_processes(n, size, processes):
    shards = [list(EvalBatchSampler(n, size, processes, p)) for p in range(processes)]
    assert len({len(s) for s in shards}) == 1  # same number of forward passes everywhere
    counted = sorted(i for s in shards for b in s if b[0] < n for i in b)
    assert counted == list(range(n))
    assert all(all(i >= n for i in b) or all(i < n for i in b) for s in shards for b in s)
