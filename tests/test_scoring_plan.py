"""Choosing the layout and LM head per model: what the setup probe picks, the fallbacks it
takes (with a log line naming the reason), and the errors an explicit choice gets."""
import json
import logging

import pytest
import torch
from transformers import GPT2LMHeadModel

from prefopt import DPOConfig, DPOTrainer
from prefopt.errors import ConfigError
from prefopt.scoring import static_layout_problem

SHORT = dict(max_length=64, max_prompt_length=32, logging_steps=1, progress_bar=False, max_steps=1,
             per_device_train_batch_size=2)


class IgnoresPositionIds(GPT2LMHeadModel):
    """A model whose forward drops position_ids (as some remote-code models do): a shared row's
    second completion then sees wrong (learned, absolute) positions, which only the probe notices."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@pytest.fixture(scope="module")
def gpt2_dir(tokenizer, tmp_path_factory):
    from prefopt.models import build_tiny_model, save_pretrained

    model = build_tiny_model(len(tokenizer), arch="gpt2", hidden_size=32, layers=2, heads=4, max_positions=256)
    return save_pretrained(model, tokenizer, tmp_path_factory.mktemp("gpt2") / "model")


def plan_of(model, demo_records, tmp_path, **kw):
    t = DPOTrainer(model, None, train_dataset=demo_records[:4], tokenizer=kw.pop("tokenizer", None),
                   args=DPOConfig(output_dir=str(tmp_path), **{**SHORT, **kw}))
    job = t.setup()
    return t._collator.layout, job.objective.scoring


def test_defaults_pick_shared_rows_split_sdpa_and_the_fused_head(tiny_model_dir, demo_records, tmp_path):
    layout, scoring = plan_of(str(tiny_model_dir), demo_records, tmp_path)
    assert (layout, scoring.head, scoring.attn) == ("shared", "fused", "prefopt_sdpa")


def test_a_model_ignoring_position_ids_falls_back_with_a_reason(gpt2_dir, demo_records, tmp_path, caplog):
    model = IgnoresPositionIds.from_pretrained(gpt2_dir)
    with caplog.at_level(logging.INFO, logger="prefopt"):
        layout, scoring = plan_of(model, demo_records, tmp_path / "auto", tokenizer=str(gpt2_dir))
    assert layout == "padded" and scoring.head == "fused"  # packed rows restart positions too
    assert "layout shared with attention 'prefopt_sdpa' not used: per-token log-probs differ" in caplog.text
    t = DPOTrainer(IgnoresPositionIds.from_pretrained(gpt2_dir), None, train_dataset=demo_records[:4],
                   tokenizer=str(gpt2_dir), args=DPOConfig(output_dir=str(tmp_path / "run"), **SHORT))
    t.train()  # and it trains on the padded layout: step-0 DPO loss is ln 2
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"] == \
        pytest.approx(0.693147, abs=1e-6)
    with pytest.raises(ConfigError, match="data.layout=shared does not reproduce the policy model's log-probs"):
        plan_of(IgnoresPositionIds.from_pretrained(gpt2_dir), demo_records, tmp_path / "explicit",
                tokenizer=str(gpt2_dir), layout="shared")


def test_a_lora_head_uses_the_models_own_head_on_scored_positions(tiny_model_dir, demo_records, tmp_path, caplog):
    lora = {"r": 4, "target_modules": ["q_proj", "lm_head"]}
    with caplog.at_level(logging.INFO, logger="prefopt"):
        layout, scoring = plan_of(str(tiny_model_dir), demo_records, tmp_path, lora=lora)
    assert scoring.head == "scored" and "not a plain nn.Linear" in caplog.text
    with pytest.raises(ConfigError, match="model.lm_head=fused: the output embedding is not a plain"):
        plan_of(str(tiny_model_dir), demo_records, tmp_path / "x", lora=lora, lm_head="fused")


def test_static_layout_problems_name_the_reason():
    from transformers import MistralConfig

    class Fake(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config

    flash = MistralConfig(sliding_window=None)
    flash._attn_implementation = "flash_attention_2"
    assert "takes no custom attention masks" in static_layout_problem(Fake(flash), "shared", 1024)
    assert static_layout_problem(Fake(flash), "packed", 1024) is None  # varlen from position ids
    windowed = MistralConfig(sliding_window=256)
    windowed._attn_implementation = "sdpa"
    assert "sliding window of 256 tokens" in static_layout_problem(Fake(windowed), "shared", 1024)
    assert static_layout_problem(Fake(windowed), "shared", 256) is None  # no sequence reaches past it
    odd = MistralConfig()
    odd._attn_implementation = "paged|eager"
    assert static_layout_problem(Fake(odd), "packed", 64) is not None


def test_users_model_gets_its_attention_back_and_split_sdpa_fails_closed(tiny_model_dir, demo_records, tmp_path):
    from transformers import AutoModelForCausalLM

    from prefopt.attention import split_sdpa_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    t = DPOTrainer(model, None, train_dataset=demo_records[:4], tokenizer=str(tiny_model_dir),
                   args=DPOConfig(output_dir=str(tmp_path), **SHORT))
    t.train()
    assert t.job.objective.scoring.attn == "prefopt_sdpa" and model.config._attn_implementation == "sdpa"
    assert t.evaluate(on="train")["eval_loss"] > 0 and model.config._attn_implementation == "sdpa"
    # a packed batch's placeholder mask reaching the kernel without its units: an error, never
    # attention across the whole row
    q = torch.zeros(1, 2, 5, 4)
    with pytest.raises(RuntimeError, match="placeholder mask without its units"):
        split_sdpa_attention(torch.nn.Module(), q, q, q, torch.ones(1, 1, 1, 1, dtype=torch.bool))
