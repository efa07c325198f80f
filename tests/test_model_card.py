"""final/README.md is a model card in the Hugging Face convention: front matter the Hub reads
(base_model, tags, datasets), then the run's base model, data, objective with its parameters,
settings, the real final metrics and the command that trains it again."""
import json

import yaml

from prefopt import DPOConfig, DPOTrainer, __version__
from prefopt.config import load_config
from prefopt.train.model_card import is_hub_id, model_card


def front_matter(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_a_trained_model_carries_its_card(tiny_model_dir, demo_records, tmp_path):
    out = tmp_path / "run"
    DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:6], eval_dataset=demo_records[6:8],
               args=DPOConfig(output_dir=str(out), max_steps=2, logging_steps=1, beta=0.25, max_length=64,
                              max_prompt_length=32, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                              learning_rate=1e-3, progress_bar=False, report_html=False)).train()
    meta, body = front_matter((out / "final" / "README.md").read_text())
    # a local directory is no hub id: named in the text, not as base_model (the Hub refuses paths there)
    assert meta["library_name"] == "transformers" and "base_model" not in meta and "datasets" not in meta
    assert meta["tags"] == ["prefopt", "dpo"] and meta["pipeline_tag"] == "text-generation"
    assert f"`{tiny_model_dir}` (a local directory)" in body
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in rows if "loss" in r][-1]
    last_eval = [r for r in rows if "eval/loss" in r][-1]
    assert last_train["step"] == 2 and last_eval["step"] == 2
    assert f"| loss | {last_train['loss']:.6g} |" in body and f"| eval/loss | {last_eval['eval/loss']:.6g} |" in body
    assert "| dpo | 1 | beta=0.25, label_smoothing=0.0," in body
    assert "- train: a dataset passed to the trainer (train_dataset): 6 examples used of 6 records (format sharegpt)" \
        in body and "- eval: a dataset passed to the trainer (eval_dataset): 2 examples used of 2 records" in body
    assert "- 2 optimizer steps; learning rate 0.001" in body
    assert "2 per device x 1 accumulation x 1 process(es) = 2 examples per optimizer step" in body
    assert f"prefopt {__version__}" in body
    assert f"prefopt dpo {out / 'config.yaml'} output_dir={out}-again data.train=YOUR_DATA" in body
    assert load_config(out / "final" / "prefopt_config.yaml").loss[0].params["beta"] == 0.25


def test_hub_ids_go_to_the_front_matter(tmp_path):
    config = load_config(None, ["model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct", "data.train=trl-lib/ultrafeedback_binarized",
                                f"data.eval={tmp_path / 'eval.jsonl'}", "loss=[{name: sigmoid_norm}, {name: sft, weight: 0.1}]",
                                "model.lora={r: 8}", "train.resume_from=latest", f"output_dir={tmp_path / 'o'}"])
    card = model_card(config, tmp_path / "o", tmp_path / "o" / "final", adapter=True)
    meta, body = front_matter(card)
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct" and meta["library_name"] == "peft"
    assert meta["datasets"] == ["trl-lib/ultrafeedback_binarized"]
    assert meta["tags"] == ["prefopt", config.loss[0].name, "sft", "lora"]
    assert "No metrics.jsonl beside this model." in body and "train.resume_from=null" in body
    rm = load_config(None, ["loss=bradley_terry", "model.name_or_path=org/rm"])
    meta, body = front_matter(model_card(rm, tmp_path, tmp_path, adapter=False))
    assert meta["pipeline_tag"] == "text-classification" and "prefopt rm " in body
    assert is_hub_id("org/name") and not is_hub_id("runs/demo/sft/final") and not is_hub_id("data/x.jsonl")
