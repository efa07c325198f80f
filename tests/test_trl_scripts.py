"""TRL scripts run on prefopt with only the import changed (issue 9).

Each script below is written as TRL 1.16's documentation writes it (the DPO quick start, the
`trl/scripts/dpo.py` flow with LoRA, evaluation and a push, a callback, the KTO and reward
examples), starts with ``from trl import ...``, and is run with that one line rewritten to
``from prefopt import ...``. No hub: the model and data are local.
"""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

SCRIPTS = {
    # TRL docs, "DPO Trainer" quick start (train_dpo.py), on a local model and in-memory data
    "quickstart": """
        from trl import DPOConfig, DPOTrainer
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(MODEL)
        tokenizer = AutoTokenizer.from_pretrained(MODEL)
        training_args = DPOConfig(output_dir=OUT, logging_steps=1, max_steps=3, per_device_train_batch_size=2,
                                  learning_rate=1e-3, max_length=128, report_to="none")
        trainer = DPOTrainer(model=model, args=training_args, processing_class=tokenizer, train_dataset=TRAIN)
        trainer.train()
    """,
    # trl/scripts/dpo.py's flow: positional (model, ref_model), LoRA, eval strategy, evaluate,
    # log/save metrics, save_model(output_dir), push_to_hub
    "script": """
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer

        training_args = DPOConfig(output_dir=OUT, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                  max_steps=4, learning_rate=5e-3, beta=0.1, loss_type=["sigmoid", "sft"],
                                  loss_weights=[1.0, 0.5], eval_strategy="steps", eval_steps=2, logging_steps=1,
                                  logging_first_step=True, bf16=False, gradient_checkpointing=False,
                                  max_length=128, max_prompt_length=64, dataset_num_proc=1, push_to_hub=True, hub_model_id=HUB,
                                  report_to=[], save_strategy="no", seed=7, warmup_steps=0.25,
                                  lr_scheduler_type="cosine")
        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
        trainer = DPOTrainer(MODEL, None, training_args, None, TRAIN, EVAL, TOKENIZER, peft_config=peft_config)
        trainer.train()
        if training_args.eval_strategy != "no":
            metrics = trainer.evaluate()
            trainer.log_metrics("eval", metrics)
            trainer.save_metrics("eval", metrics)
        trainer.save_model(training_args.output_dir)
        if training_args.push_to_hub:
            trainer.push_to_hub(dataset_name="local")
    """,
    # a TrainerCallback that records what it sees and stops training early
    "callback": """
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer

        class Recorder(TrainerCallback):
            def __init__(self):
                self.events = []
            def on_step_end(self, args, state, control, **kwargs):
                self.events.append(("step_end", state.global_step))
                if state.global_step == 1:
                    control.should_save = True
                if state.global_step == 3:
                    control.should_training_stop = True
            def on_log(self, args, state, control, logs=None, **kwargs):
                self.events.append(("log", state.global_step, sorted(logs)))
            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                self.events.append(("evaluate", state.global_step, metrics["eval_loss"]))
            def on_save(self, args, state, control, **kwargs):
                self.events.append(("save", state.global_step))
            def on_train_end(self, args, state, control, model=None, **kwargs):
                self.events.append(("train_end", state.global_step, args.learning_rate, type(model).__name__))

        recorder = Recorder()
        args = DPOConfig(output_dir=OUT, max_steps=10, per_device_train_batch_size=2, logging_steps=2,
                         learning_rate=1e-3, max_length=128)
        trainer = DPOTrainer(MODEL, args=args, train_dataset=TRAIN, eval_dataset=EVAL, processing_class=TOKENIZER,
                             callbacks=[recorder])
        trainer.train()
    """,
    # KTO and reward-model examples of TRL's docs
    "kto": """
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(output_dir=OUT, max_steps=2, per_device_train_batch_size=4, desirable_weight=1.0,
                         undesirable_weight=1.5, max_length=128, logging_steps=1)
        trainer = KTOTrainer(model=MODEL, args=args, processing_class=TOKENIZER, train_dataset=UNPAIRED)
        trainer.train()
    """,
    "reward": """
        from trl import RewardConfig, RewardTrainer

        args = RewardConfig(output_dir=OUT, max_steps=2, per_device_train_batch_size=2, max_length=128,
                            center_rewards_coefficient=0.01, logging_steps=1)
        trainer = RewardTrainer(model=MODEL, args=args, processing_class=TOKENIZER, train_dataset=TRAIN)
        trainer.train()
    """,
}


def pairs(records):
    return [{"prompt": r["conversations"][-1]["value"], "chosen": r["chosen"]["value"],
             "rejected": r["rejected"]["value"]} for r in records]


def run_script(name: str, **names) -> dict:
    source = textwrap.dedent(SCRIPTS[name])
    assert "from trl import" in source
    ported = source.replace("from trl import", "from prefopt import")  # the only change
    scope = dict(names)
    exec(compile(ported, f"<trl script {name}>", "exec"), scope)
    return scope


@pytest.fixture
def data(demo_records):
    return pairs(demo_records[:8]), pairs(demo_records[280:284])


def test_quickstart(tiny_model_dir, data, tmp_path):
    scope = run_script("quickstart", MODEL=str(tiny_model_dir), OUT=str(tmp_path), TRAIN=data[0])
    trainer = scope["trainer"]
    history = trainer.state.log_history
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    assert history[-1]["train_loss"] == pytest.approx(sum(r["loss"] for r in history[:3]) / 3)
    assert trainer.state.global_step == 3 and (tmp_path / "final" / "model.safetensors").is_file()


def test_dpo_script_with_lora_eval_metrics_and_push(tiny_model_dir, tokenizer, data, tmp_path):
    hub = tmp_path / "hub" / "org-model"
    scope = run_script("script", MODEL=str(tiny_model_dir), OUT=str(tmp_path / "out"), TRAIN=data[0], EVAL=data[1],
                       TOKENIZER=tokenizer, HUB=str(hub))
    trainer, args = scope["trainer"], scope["training_args"]
    cfg = trainer.config
    assert [(t.name, t.weight) for t in cfg.loss] == [("dpo", 1.0), ("sft", 0.5)]
    assert cfg.loss[0].params["beta"] == 0.1
    assert (cfg.train.warmup_ratio, cfg.train.seed, cfg.train.mixed_precision) == (0.25, 7, "no")
    assert cfg.model.lora["r"] == 8 and args.eval_strategy == "steps" and args.bf16 is False
    history = trainer.state.log_history
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4]  # logging_first_step + every step
    assert [r["step"] for r in history if "eval_loss" in r] == [2, 4, 4]  # eval_steps 2, then evaluate()
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert metrics["eval_loss"] == history[-1]["eval_loss"]
    assert (tmp_path / "out" / "adapter_config.json").is_file()  # save_model(output_dir): the adapter
    assert (hub / "adapter_config.json").is_file() and "library_name: peft" in (hub / "README.md").read_text()
    assert not (tmp_path / "out" / "checkpoints").exists()  # save_strategy="no"


def test_callbacks_see_every_event_and_can_stop_and_save(tiny_model_dir, tokenizer, data, tmp_path):
    scope = run_script("callback", MODEL=str(tiny_model_dir), OUT=str(tmp_path), TRAIN=data[0], EVAL=data[1],
                       TOKENIZER=tokenizer)
    events, trainer = scope["recorder"].events, scope["trainer"]
    kinds = [e[0] for e in events]
    assert [e[1] for e in events if e[0] == "step_end"] == [1, 2, 3]  # stopped by control.should_training_stop
    assert ("save", 1) in events and (tmp_path / "checkpoints" / "step-1").is_dir()  # control.should_save
    logs = [e for e in events if e[0] == "log"]
    assert [e[1] for e in logs] == [2, 3, 3, 3]  # logging_steps 2, the stopping step, the final eval, the summary
    assert "rewards/accuracies" in logs[0][2] and "eval_loss" in logs[2][2] and "train_runtime" in logs[3][2]
    evaluated = [e for e in events if e[0] == "evaluate"]
    assert len(evaluated) == 1 and evaluated[0][2] == trainer.final_eval["eval/loss"]
    assert events[-1] == ("train_end", 3, 1e-3, "LlamaForCausalLM") and kinds.count("train_end") == 1
    assert trainer.state.global_step == 3 and (tmp_path / "final" / "model.safetensors").is_file()


def test_kto_and_reward_trainers(tiny_model_dir, tokenizer, demo_records, data, tmp_path):
    unpaired = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"} for p in data[0] for k in
                ("chosen", "rejected")]
    kto = run_script("kto", MODEL=str(tiny_model_dir), OUT=str(tmp_path / "kto"), UNPAIRED=unpaired,
                     TOKENIZER=tokenizer)["trainer"]
    assert kto.config.loss[0].name == "kto" and kto.config.loss[0].params["undesirable_weight"] == 1.5
    assert kto.state.global_step == 2
    rm = run_script("reward", MODEL=str(tiny_model_dir), OUT=str(tmp_path / "rm"), TRAIN=data[0],
                    TOKENIZER=tokenizer)["trainer"]
    assert rm.config.loss[0].params["center_rewards_coefficient"] == 0.01
    assert type(rm.model).__name__ == "LlamaForSequenceClassification" and rm.state.global_step == 2


def test_push_to_hub_goes_through_huggingface_hub(tiny_model_dir, tokenizer, data, tmp_path, monkeypatch):
    """A hub id: the repository is created (private as asked) and final/ uploaded to it."""
    import huggingface_hub

    from prefopt import DPOConfig, DPOTrainer

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(self, repo_id, branch, exist_ok=False):
            calls.append(("create_branch", repo_id, branch))

        def upload_folder(self, folder_path, repo_id, revision=None, commit_message=None):
            calls.append(("upload_folder", sorted(p.name for p in Path(folder_path).iterdir()), repo_id, revision,
                          commit_message))
            return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
                                              commit_message=commit_message, commit_description="", oid="abc")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, max_length=128,
                     push_to_hub=True, hub_model_id="org/tiny-dpo", hub_private_repo=True, hub_revision="v1")
    DPOTrainer(str(tiny_model_dir), args=args, train_dataset=data[0], processing_class=tokenizer).train()
    assert calls[0] == ("create_repo", "org/tiny-dpo", True, True)
    assert calls[1] == ("create_branch", "org/tiny-dpo", "v1")
    name, files, repo, revision, message = calls[2]
    assert (name, repo, revision, message) == ("upload_folder", "org/tiny-dpo", "v1", "End of training")
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)


def test_callback_requests_act_at_the_step_that_made_them_and_epoch_events(tiny_model_dir, tokenizer, data, tmp_path):
    """A stop asked in on_evaluate stops at that step (no extra step, no second evaluation); epoch
    events frame each epoch (8 pairs, batches of 2, accumulation 2: 2 steps per epoch)."""
    from transformers import TrainerCallback

    from prefopt import DPOConfig, DPOTrainer

    seen = []

    class StopAfterSecondEval(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kw):
            seen.append(("epoch_begin", state.global_step))

        def on_epoch_end(self, args, state, control, **kw):
            seen.append(("epoch_end", state.global_step))

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            seen.append(("evaluate", state.global_step))
            control.should_training_stop = state.global_step == 4

    args = DPOConfig(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     max_length=128, eval_strategy="epoch")
    trainer = DPOTrainer(str(tiny_model_dir), args=args, train_dataset=data[0], eval_dataset=data[1],
                         processing_class=tokenizer, callbacks=[StopAfterSecondEval])
    trainer.train()
    assert seen == [("epoch_begin", 0), ("epoch_end", 2), ("evaluate", 2), ("epoch_begin", 2), ("epoch_end", 4),
                    ("evaluate", 4)]
    assert trainer.state.global_step == 4 and trainer.state.log_history[-1]["train_loss"] > 0


def test_a_bare_hub_name_is_pushed_to_the_hub_even_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    import huggingface_hub

    from prefopt.hub import is_local, push_folder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model" / "final").mkdir(parents=True)
    (tmp_path / "my-model" / "final" / "config.json").write_text("{}")
    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, private=None, exist_ok=False):
            return huggingface_hub.RepoUrl(f"https://huggingface.co/user/{repo_id}")

        def upload_folder(self, folder_path, repo_id, revision=None, commit_message=None):
            uploads.append(repo_id)
            return "url"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert not is_local("my-model") and is_local("./my-model") and is_local("file:///x")
    push_folder(tmp_path / "my-model" / "final", "my-model")
    assert uploads == ["user/my-model"] and not (tmp_path / "my-model" / "config.json").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(model_init=lambda: None), "model_init: not supported by prefopt; pass the model"),
    (dict(formatting_func=str), "formatting_func: not supported by prefopt; give the data in one of"),
    (dict(compute_loss_func=sum), "compute_loss_func: not supported by prefopt"),
    (dict(data_collator=object()), "data_collator: prefopt forms its batches itself"),
    (dict(compute_metrics=len), "compute_metrics: TRL passes it the full-vocabulary logits"),
    (dict(max_length=128), "max_length: config fields, given to the trainer"),
    (dict(quantization_config={"load_in_4bit": True, "bnb_4bit_use_double_quant": True}), "double_quant=True"),
    (dict(quantization_config={"load_in_8bit": True}), "8-bit and other quantizations are not supported"),
])
def test_trl_trainer_arguments_prefopt_has_no_use_for_are_refused_by_name(tiny_model_dir, kwargs, message):
    from prefopt import ConfigError, DPOTrainer

    with pytest.raises(ConfigError, match=message):
        DPOTrainer(str(tiny_model_dir), **kwargs)
    DPOTrainer(str(tiny_model_dir), model_init=None, preprocess_logits_for_metrics=None)  # TRL's defaults pass
