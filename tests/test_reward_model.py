"""Reward models: the Bradley–Terry loss by hand, the reward read at each sequence's last token
(equal to transformers' own pooling on plain rows, and the same in every layout), training
raises pairwise accuracy, `prefopt rm` writes the calibration table, and the trained model
judges."""
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from prefopt import RewardConfig, RewardTrainer
from prefopt.cli import main
from prefopt.data.collate import make_collator
from prefopt.judges import judge_all, make_judge
from prefopt.logps import Scoring, score_batch
from prefopt.rewards import calibration

from test_layouts import PAIR_ROLES, random_pairs

SHORT = dict(max_length=64, max_prompt_length=32, logging_steps=1, progress_bar=False)


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir):
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    model.config.pad_token_id = 0
    return model.eval()


def test_reward_at_the_last_token_equals_transformers_pooling_and_every_layout(reward_model):
    examples = random_pairs(5)
    padded = make_collator("padded", 0, PAIR_ROLES)(examples)
    scoring = Scoring.for_model(reward_model, "reward")
    with torch.no_grad():
        ours = score_batch(reward_model, padded, scoring).logps
        theirs = reward_model(input_ids=padded.input_ids, attention_mask=padded.attention.padding).logits[:, 0]
    # padded rows are one sequence each (right-padded, pad id 0 never inside a sequence here)
    assert torch.allclose(ours, theirs, atol=1e-5)
    for layout in ("packed", "shared"):
        batch = make_collator(layout, 0, PAIR_ROLES)(examples)
        with torch.no_grad():
            got = score_batch(reward_model, batch, scoring).logps
        for role in PAIR_ROLES:
            assert torch.allclose(got[batch.index[role]], ours[padded.index[role]], atol=1e-5), (layout, role)


def test_training_raises_pairwise_accuracy_and_the_model_judges(tiny_model_dir, demo_records, tmp_path):
    data = demo_records[:12]
    trainer = RewardTrainer(str(tiny_model_dir), train_dataset=data,
                            args=RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=30, learning_rate=3e-3,
                                              per_device_train_batch_size=4, **SHORT))
    trainer.setup()
    before = trainer.calibration("train")
    trainer.train()
    after = trainer.calibration("train")
    assert after["accuracy"] > max(before["accuracy"], 0.9) and after["mean_margin"] > before["mean_margin"]
    rows = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= rows[-1].keys()
    assert "logps/chosen" not in rows[-1] and "mean_token_accuracy" not in rows[-1]
    final = tmp_path / "rm" / "final"
    assert AutoModelForSequenceClassification.from_pretrained(str(final)).config.num_labels == 1
    # the trained model as a judge: the same rewards as in training, chosen above rejected
    judge = make_judge({"name": "reward_model", "path": str(final), "max_length": 64, "max_prompt_length": 32})
    from prefopt.methods.rounds import completion_text
    from prefopt.data.formats import get_format
    pairs = [get_format("sharegpt").convert(r) for r in data]
    chosen = judge_all(judge, [p["prompt"] for p in pairs], [completion_text(p["chosen"]) for p in pairs])
    rejected = judge_all(judge, [p["prompt"] for p in pairs], [completion_text(p["rejected"]) for p in pairs])
    assert chosen.failures == [] and rejected.failures == []
    wins = sum(c > r for c, r in zip(chosen.scores, rejected.scores))
    assert wins / len(pairs) >= 0.9


def test_lora_reward_model_trains_its_head_and_judges_from_the_adapter(tiny_model_dir, demo_records, tmp_path):
    """LoRA on a reward model: the new score head trains whole (peft's modules_to_save), the
    final adapter carries it, and the adapter directory judges with the trained rewards."""
    from safetensors.torch import load_file

    data = demo_records[:12]
    trainer = RewardTrainer(str(tiny_model_dir), train_dataset=data,
                            args=RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=30, learning_rate=1e-2,
                                              per_device_train_batch_size=4, lora={"r": 8}, **SHORT))
    trainer.setup()
    head_before = trainer.job.model.base_model.model.score.modules_to_save["default"].weight.detach().clone()
    before = trainer.calibration("train")
    trainer.train()
    after = trainer.calibration("train")
    assert after["accuracy"] > max(before["accuracy"], 0.9)
    final = tmp_path / "rm" / "final"
    saved = load_file(final / "adapter_model.safetensors")
    (head,) = [k for k in saved if k.endswith("score.weight")]
    assert not torch.equal(saved[head], head_before) and any("lora_A" in k for k in saved)
    judge = make_judge({"name": "reward_model", "path": str(final), "max_length": 64, "max_prompt_length": 32})
    assert not hasattr(judge.model, "peft_config")  # merged into a plain sequence classifier
    from prefopt.data.formats import get_format
    from prefopt.methods.rounds import completion_text
    pairs = [get_format("sharegpt").convert(r) for r in data]
    chosen = judge_all(judge, [p["prompt"] for p in pairs], [completion_text(p["chosen"]) for p in pairs]).scores
    rejected = judge_all(judge, [p["prompt"] for p in pairs], [completion_text(p["rejected"]) for p in pairs]).scores
    # the merged model's rewards are the trained model's (the same pairs, the same tokenisation)
    from prefopt.rewards import pair_rewards
    trained = pair_rewards(trainer.job.model, trainer._eval_loader(trainer._train_set), trainer.job.objective.scoring)
    assert torch.allclose(torch.tensor(chosen), trained[0], atol=1e-4)
    assert torch.allclose(torch.tensor(rejected), trained[1], atol=1e-4)
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(pairs) >= 0.9


def test_calibration_table_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.1, -1.0, 3.0]), torch.tensor([0.0, 0.0, 0.0, 0.0])
    got = calibration(chosen, rejected, bins=5)
    # p = σ(2) 0.881, σ(0.1) 0.525, σ(-1) 0.269 (confidence 0.731, wrong), σ(3) 0.953
    assert got["accuracy"] == 0.75 and got["pairs"] == 4
    bins = {row["confidence"]: row for row in got["calibration"]}
    assert bins["0.5-0.6"]["pairs"] == 1 and bins["0.5-0.6"]["accuracy"] == 1.0
    assert bins["0.7-0.8"]["pairs"] == 1 and bins["0.7-0.8"]["accuracy"] == 0.0
    assert bins["0.8-0.9"]["pairs"] == 1 and bins["0.9-1.0"]["pairs"] == 1


def test_cli_rm_writes_the_calibration_table(tiny_model_dir, tmp_path, capsys):
    from pathlib import Path
    data = Path(__file__).resolve().parents[1] / "prefopt" / "demo" / "data" / "dpo_en_demo.json"
    out = tmp_path / "rm"
    assert main(["rm", f"model.name_or_path={tiny_model_dir}", f"data.train={data}", "data.max_examples=16",
                 "data.eval_split_size=4", f"output_dir={out}", "train.max_steps=2", "data.max_length=64",
                 "data.max_prompt_length=32", "train.progress_bar=false"]) == 0
    result = json.loads((out / "reward_calibration.json").read_text())
    assert result["data"] == "eval" and result["pairs"] == 4 and len(result["calibration"]) == 5
    assert "| confidence | pairs | mean confidence | accuracy |" in (out / "reward_calibration.md").read_text()
    assert "AutoModelForSequenceClassification" in capsys.readouterr().out
