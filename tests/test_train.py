"""Tiny end-to-end runs on CPU: the numbers that prove the loop is right."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from helpers import first_step_gradient

SHORT = dict(max_length=64, max_prompt_length=32, logging_steps=1, progress_bar=False)


def dpo(tiny_model_dir, records, out, **kw):
    args = DPOConfig(output_dir=str(out), **{**SHORT, **kw})
    return DPOTrainer(str(tiny_model_dir), None, train_dataset=records, args=args)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_loss_is_ln2_at_step_0_and_reward_accuracy_rises(tiny_model_dir, demo_records, tmp_path):
    trainer = dpo(tiny_model_dir, demo_records[:16], tmp_path, learning_rate=5e-3, max_steps=12,
                  per_device_train_batch_size=8, beta=0.1)
    before = trainer.evaluate(on="train")
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert before["eval_rewards/margins"] == 0.0
    trainer.train()
    rows = metrics(tmp_path)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # first forward: policy == reference
    after = trainer.evaluate(on="train")
    assert after["eval_rewards/accuracies"] >= 0.9 and after["eval_rewards/margins"] > 0
    assert after["eval_loss"] < 0.5


def test_output_layout_and_metric_names(tiny_model_dir, demo_records, tmp_path):
    trainer = dpo(tiny_model_dir, demo_records[:12], tmp_path, max_steps=4, save_steps=2,
                  per_device_train_batch_size=2, eval_split_size=4, eval_steps=2)
    trainer.train()
    rows = metrics(tmp_path)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4] and [r["step"] for r in eval_rows] == [2, 4]
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm",
                 "learning_rate", "tokens_per_second", "epoch", "num_tokens"):
        assert name in train_rows[0], name
    assert "eval/rewards/accuracies" in eval_rows[0]
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "data_report.json").is_file()
    for step in (2, 4):
        ckpt = tmp_path / "checkpoints" / f"step-{step}"
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.yaml").is_file()
        # the frozen reference is rebuilt from the config, never stored in a checkpoint
        assert [p.name for p in ckpt.glob("*.safetensors")] == ["model.safetensors"]
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    AutoTokenizer.from_pretrained(tmp_path / "final")
    # a checkpoint folder is a loadable HF model too, with the weights of that step
    ckpt_model = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "step-4")
    for (n, a), b in zip(final.state_dict().items(), ckpt_model.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("accum, resume_step", [(1, 3), (2, 4)])
def test_resume_gives_identical_weights(tiny_model_dir, demo_records, tmp_path, accum, resume_step):
    """6 uninterrupted steps == resume from the step-k checkpoint of the same run + the rest."""
    data = demo_records[:10]  # with batch 2: 5 micro-batches per epoch, so epochs end mid-window
    common = dict(max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=accum,
                  learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=2)
    dpo(tiny_model_dir, data, tmp_path / "full", save_steps=resume_step, **common).train()
    ckpt = tmp_path / "full" / "checkpoints" / f"step-{resume_step}"
    resumed = dpo(tiny_model_dir, data, tmp_path / "resumed", resume_from=str(ckpt), **common)
    resumed.train()
    full = load_file(tmp_path / "full" / "final" / "model.safetensors")
    again = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert full.keys() == again.keys()
    for name in full:
        assert torch.equal(full[name], again[name]), name
    # the resumed run logged only the steps after the checkpoint
    assert [r["step"] for r in metrics(tmp_path / "resumed") if "loss" in r] == list(range(resume_step + 1, 7))


@pytest.mark.parametrize("layout", ["padded", "shared"])
@pytest.mark.parametrize("loss", ["sft", "dpo"])
def test_micro_batch_times_accumulation_equivalence(tiny_model_dir, demo_records, tmp_path, loss, layout):
    """8 examples in one step: 8x1, 2x4 and 3x3 (windows 3, 3, 2) give the same gradient, in
    either layout (and the layouts give the same gradient as each other, within fp32 noise).

    SFT is normalised by the target tokens of the whole step and DPO by its examples,
    so uneven micro-batches must not reweight anything."""
    grads = []
    for mb, accum in ((8, 1), (2, 4), (3, 3)):
        cls, cfg = (SFTTrainer, SFTConfig) if loss == "sft" else (DPOTrainer, DPOConfig)
        args = cfg(output_dir=str(tmp_path / f"{mb}x{accum}"), per_device_train_batch_size=mb,
                   gradient_accumulation_steps=accum, max_grad_norm=None, layout=layout, **SHORT)
        trainer = cls(str(tiny_model_dir), train_dataset=demo_records[:8], args=args)
        grads.append(first_step_gradient(trainer))
    assert grads[0].abs().max() > 0
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], atol=1e-6, rtol=1e-4)


def test_sft_learns_and_reports_token_metrics(tiny_model_dir, demo_records, tmp_path):
    args = SFTConfig(output_dir=str(tmp_path), learning_rate=1e-2, max_steps=15,
                     per_device_train_batch_size=4, **SHORT)
    SFTTrainer(str(tiny_model_dir), train_dataset=demo_records[:8], args=args).train()
    rows = metrics(tmp_path)
    assert rows[0]["loss"] == pytest.approx(math.log(512), abs=0.3)  # random init: ~uniform over 512
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert {"mean_token_accuracy", "logps/completion", "grad_norm"} <= rows[0].keys()
    assert "rewards/chosen" not in rows[0]


def test_reference_is_frozen_and_evaluation_never_uses_the_trained_policy(tiny_model_dir, demo_records, tmp_path):
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    trainer = dpo(tiny_model_dir, demo_records[:8], tmp_path, learning_rate=5e-3, max_steps=4,
                  per_device_train_batch_size=4)
    trainer.train()
    ref = trainer.job.objective.reference.model
    for name, value in ref.state_dict().items():
        assert torch.equal(value, initial[name]), name
    result = trainer.evaluate(on="train")
    assert result["eval_rewards/margins"] != 0.0  # against the policy itself it would be exactly 0


def test_python_api_accepts_model_objects_and_hf_datasets(tiny_model_dir, demo_records, tmp_path):
    import datasets

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ds = datasets.Dataset.from_list([{"prompt": r["conversations"][-1]["value"], "chosen": r["chosen"]["value"],
                                      "rejected": r["rejected"]["value"]} for r in demo_records[:6]])
    trainer = DPOTrainer(model, None, beta=0.2, train_dataset=ds, eval_dataset=ds, tokenizer=tok,
                         args=DPOConfig(output_dir=str(tmp_path), max_steps=2, **SHORT))
    result = trainer.train()
    assert trainer.config.loss[0].params["beta"] == 0.2 and "eval_loss" in result.metrics
    assert result.global_step == 2 and result.metrics["eval_loss"] == trainer.final_eval["eval/loss"]
    assert trainer.model is model  # trained in place
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_fp16_on_cpu_says_it_trains_float32(tiny_model_dir, demo_records, tmp_path, caplog):
    """accelerate makes fp16 (autocast, loss scaling) on GPUs only: on CPU it trained float32 while
    its state said fp16, and prefopt's precision line said "fp16 autocast". Now a warning says so and
    the accelerator is the float32 one it really is."""
    caplog.set_level("INFO", logger="prefopt")
    job = dpo(tiny_model_dir, demo_records[:4], tmp_path, max_steps=1, mixed_precision="fp16").setup()
    assert (job.accelerator.mixed_precision, job.accelerator.native_amp, job.accelerator.scaler) == ("no", False, None)
    assert ("train.mixed_precision=fp16: accelerate has no fp16 autocast or loss scaling on cpu; this run trains "
            "in float32 (as with train.mixed_precision=no)") in caplog.text
    assert "precision: float32" in caplog.text and "precision: fp16" not in caplog.text


def test_bf16_autocast_keeps_policy_and_reference_on_the_same_path(tiny_model_dir, demo_records, tmp_path):
    """Under bf16 autocast (CPU here) the first loss is still exactly ln 2: policy and reference run
    through the same score_batch in the same precision, and log-softmax is taken in float32."""
    trainer = dpo(tiny_model_dir, demo_records[:8], tmp_path, max_steps=3, per_device_train_batch_size=4,
                  mixed_precision="bf16", learning_rate=1e-3)
    trainer.train()
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] != rows[0]["loss"]
