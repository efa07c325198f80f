"""Sampling-based evaluation: the estimators on hand-made numbers, the log-probs of sampled
tokens against a naive forward, and `prefopt eval` with eval.generate end to end."""
import json
import math

import pytest
import torch

from prefopt.cli import main
from prefopt.config import GenerateConfig, ModelConfig
from prefopt.data.report import DataReport
from prefopt.eval.sampled import Estimate, sample_logps, sampled_kl, win_rate
from prefopt.generate import TransformersSampler, encode_prompts, generate, load_inference_model
from prefopt.models import load_tokenizer


def test_win_rate_counts_ties_as_half_and_skips_failures():
    got = win_rate([1.0, 2.0, None, 3.0, 0.5], [1.0, 1.0, 5.0, 4.0, None])
    assert got == {"win_rate": 0.5, "wins": 1, "ties": 1, "losses": 1, "comparisons": 3}
    assert win_rate([None], [1.0])["win_rate"] is None


def test_sampled_kl_is_the_mean_log_ratio_with_its_standard_error():
    kl = sampled_kl([-1.0, -2.0, -3.0], [-1.5, -2.0, -2.0])      # log-ratios 0.5, 0, -1
    assert kl.mean == pytest.approx(-1 / 6)
    var = ((0.5 + 1 / 6) ** 2 + (1 / 6) ** 2 + (-1 + 1 / 6) ** 2) / 2
    assert kl.se == pytest.approx(math.sqrt(var / 3)) and kl.n == 3
    assert Estimate.of([]) == Estimate(None, None, 0) and Estimate.of([2.0]) == Estimate(2.0, None, 1)


def test_sample_logps_equal_a_naive_forward(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_inference_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    gens = encode_prompts(["Name a colour.", "Hi there, how are"], tok, 128, 10, DataReport("p"))
    generate(TransformersSampler(model, tok), gens, GenerateConfig(max_new_tokens=10, num_samples=2), 3,
             progress=False)
    got = sample_logps(model, gens, tok.pad_token_id, batch_size=3)
    k = 0
    for g in gens:
        for s in g.samples:
            ids = g.prompt_ids + s.token_ids
            with torch.no_grad():
                logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            want = sum(float(logprobs[len(g.prompt_ids) - 1 + t, tok_id]) for t, tok_id in enumerate(s.token_ids))
            assert got[k] == pytest.approx(want, abs=1e-4)
            k += 1


def test_eval_generate_sweep_writes_the_reward_kl_table(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Name a colour.", "Hi", "Tell me a fact."]))
    out = tmp_path / "ev"
    assert main(["eval", f"model.name_or_path={tiny_model_dir}", f"reference.name_or_path={tiny_model_dir}",
                 f"generate.prompts={prompts}", f"output_dir={out}", "eval.generate=true",
                 f"eval.sweep=['{tiny_model_dir}', '{tiny_model_dir}']", "eval.best_of_n=3",
                 "eval.judge={name: length}", "generate.temperature=0", "generate.max_new_tokens=6",
                 "generate.num_samples=2", "train.progress_bar=false"]) == 0
    result = json.loads((out / "sampled_eval.json").read_text())
    assert len(result["models"]) == 2 and result["prompts"] == 3
    for row in result["models"]:
        # the same model greedily: identical samples, zero KL, every comparison a tie
        assert row["kl"] == 0.0 and row["kl_se"] == 0.0
        assert (row["win_rate"], row["ties"], row["comparisons"]) == (0.5, 6, 6)
        assert row["reward"] == row["reference_reward"] == row["best_of_n_reward"]
        assert row["best_of_n"] == 3 and row["judge_failures"] == 0 and row["samples"] == 6
    table = (out / "reward_kl.csv").read_text().splitlines()
    assert table[0].startswith("model,reward,reward_se,kl,kl_se,win_rate") and len(table) == 3
    assert (out / "samples" / "reference.jsonl").is_file() and (out / "samples" / "policy-1.jsonl").is_file()


def test_eval_generate_needs_a_reference(tiny_model_dir, tmp_path, capsys):
    assert main(["eval", f"model.name_or_path={tiny_model_dir}", "eval.generate=true",
                 f"output_dir={tmp_path}", "generate.prompts=x.jsonl"]) == 2
    assert "set reference.name_or_path" in capsys.readouterr().err
