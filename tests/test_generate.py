"""Sampling: batched left-padded generation equals each prompt alone and a naive greedy decode;
seeds reproduce; EOS and stop strings cut completions; bad prompts and settings are clear."""
import json
from pathlib import Path

import pytest
import torch

from prefopt.cli import main
from prefopt.config import DataConfig, GenerateConfig
from prefopt.data.report import DataReport
from prefopt.errors import ConfigError, DataError
from prefopt.generate import (Generation, TransformersSampler, encode_prompts, finish, generate,
                              load_inference_model, load_prompts)
from prefopt.models import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "prefopt" / "demo" / "data" / "dpo_en_demo.json"
PROMPTS = ["Name a colour.", [{"role": "user", "content": "How many legs does a spider have? Answer briefly."}],
           "Hi", [{"role": "user", "content": "Write one short sentence about the sea."}]]


@pytest.fixture(scope="module")
def sampler(tiny_model_dir):
    from prefopt.config import ModelConfig

    tok = load_tokenizer(str(tiny_model_dir))
    return TransformersSampler(load_inference_model(ModelConfig(name_or_path=str(tiny_model_dir))), tok)


def encoded(sampler, prompts=PROMPTS, max_new_tokens=12) -> list[Generation]:
    return encode_prompts(prompts, sampler.tok, 256, max_new_tokens, DataReport("prompts"))


def naive_greedy(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """Full forward over the whole sequence at every step (no cache, no padding), argmax."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
    return out[len(ids):]


def test_batched_greedy_equals_each_prompt_alone_and_a_naive_decode(sampler):
    cfg = GenerateConfig(temperature=0, max_new_tokens=12, batch_size=4)
    batched = generate(sampler, encoded(sampler), cfg, seed=0, progress=False)
    alone = generate(sampler, encoded(sampler), GenerateConfig(temperature=0, max_new_tokens=12, batch_size=1),
                     seed=0, progress=False)
    assert len({len(g.prompt_ids) for g in batched}) > 1  # the batch really was left-padded
    for b, a in zip(batched, alone):
        assert [(s.text, s.num_tokens, s.finish_reason) for s in b.samples] == \
               [(s.text, s.num_tokens, s.finish_reason) for s in a.samples]
        want = naive_greedy(sampler.model, b.prompt_ids, 12, sampler.eos)
        want_sample = finish(want, sampler.tok, sampler.eos, [], 12)
        assert (b.samples[0].text, b.samples[0].num_tokens) == (want_sample.text, want_sample.num_tokens)
        assert b.samples[0].num_tokens == len([t for t in want if t != sampler.eos])


def test_sampling_is_reproducible_with_a_seed_and_gives_n_samples(sampler):
    cfg = GenerateConfig(temperature=1.0, top_k=50, top_p=0.95, max_new_tokens=10, num_samples=3, batch_size=2)
    texts = []
    for seed in (7, 7, 8):
        gens = generate(sampler, encoded(sampler, max_new_tokens=10), cfg, seed=seed, progress=False)
        assert all(len(g.samples) == 3 for g in gens)
        texts.append([[s.text for s in g.samples] for g in gens])
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]
    assert len({t for g in texts[0] for t in g}) > 3  # samples differ from each other


def test_finish_cuts_at_eos_and_before_stop_strings(sampler):
    tok, eos = sampler.tok, sampler.eos
    ids = tok("red and blue. Then green", add_special_tokens=False)["input_ids"]
    s = finish(ids + [eos] + ids, tok, eos, [], 99)
    assert (s.text, s.num_tokens, s.finish_reason) == (tok.decode(ids), len(ids), "eos")
    s = finish(ids, tok, eos, [". Then"], len(ids))
    assert s.text == "red and blue" and s.finish_reason == "stop"
    upto = next(k for k in range(1, len(ids) + 1) if ". Then" in tok.decode(ids[:k]))
    assert s.num_tokens == upto
    s = finish(ids, tok, eos, [], len(ids))
    assert (s.text, s.num_tokens, s.finish_reason) == (tok.decode(ids), len(ids), "length")


def test_stop_strings_reach_generate(sampler):
    cfg = GenerateConfig(temperature=0, max_new_tokens=12)
    free = generate(sampler, encoded(sampler, PROMPTS[:1]), cfg, seed=0, progress=False)[0].samples[0]
    assert len(free.text) > 3
    stop = free.text[2:4]
    cut = generate(sampler, encoded(sampler, PROMPTS[:1]), GenerateConfig(temperature=0, max_new_tokens=12,
                                                                          stop=[stop]), seed=0, progress=False)
    sample = cut[0].samples[0]
    assert sample.finish_reason == "stop" and sample.text == free.text[:free.text.find(stop)]


def test_prompts_of_any_format_and_prompt_only_records(tmp_path):
    report = DataReport("prompts")
    from_pairs = load_prompts(str(DATA), DataConfig(max_examples=3), report)
    assert report.format == "sharegpt" and len(from_pairs) == 3 and from_pairs[0].conversational
    only = tmp_path / "prompts.jsonl"
    only.write_text('{"prompt": "a"}\n{"prompt": [{"role": "user", "content": "b"}]}\n')
    got = load_prompts(str(only), DataConfig(), DataReport("prompts"))
    assert [g.prompt for g in got] == ["a", [{"role": "user", "content": "b"}]]
    assert str(got[1].origin).endswith(":2")


def test_training_refuses_prompt_only_data(tiny_model_dir, tmp_path, capsys):
    only = tmp_path / "prompts.jsonl"
    only.write_text('{"prompt": "a"}\n')
    assert main(["dpo", f"model.name_or_path={tiny_model_dir}", f"data.train={only}",
                 f"output_dir={tmp_path / 'out'}", "train.progress_bar=false"]) == 2
    err = capsys.readouterr().err
    assert "prompts.jsonl:1" in err and "prompts only" in err and "chosen and rejected" in err


def test_long_prompts_are_bad_records_and_bad_settings_are_refused(sampler, tmp_path):
    long = "word " * 300
    with pytest.raises(DataError, match=r"<prompts> record 2: the prompt has .* at most 16 fit"):
        encode_prompts(["short", long], sampler.tok, 64, 48, DataReport("prompts"))
    report = DataReport("prompts", "skip")
    gens = encode_prompts(["short", long], sampler.tok, 64, 48, report)
    assert len(gens) == 1 and report.rejected["too_long"] == 1
    with pytest.raises(ConfigError, match="n = 0"):
        generate(sampler, gens, GenerateConfig(num_samples=0), seed=0)
    with pytest.raises(ConfigError, match="leaves no room"):
        encode_prompts(["x"], sampler.tok, 64, 64, DataReport("prompts"))


def test_cli_generate_writes_jsonl_and_report(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Name a colour."}\n{"prompt": "' + "long " * 200 + '"}\n{"prompt": "Hi"}\n')
    out = tmp_path / "gen"
    args = ["generate", f"model.name_or_path={tiny_model_dir}", f"generate.prompts={prompts}", f"output_dir={out}",
            "generate.num_samples=2", "generate.max_new_tokens=6", "generate.temperature=0.8", "generate.seed=3",
            "data.max_length=64", "train.progress_bar=false"]
    assert main(args) == 2  # the long prompt stops the run, naming its line
    assert "p.jsonl:2" in capsys.readouterr().err
    assert main(args + ["data.on_error=skip"]) == 0
    lines = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in lines] == ["Name a colour.", "Hi"]
    assert all(len(x["completions"]) == 2 for x in lines)
    for x in lines:
        assert x["sampling"] == {"num_samples": 2, "max_new_tokens": 6, "temperature": 0.8, "top_p": 1.0, "top_k": 0,
                                 "stop": [], "seed": 3, "batch_size": 16, "backend": "transformers"}
        for c in x["completions"]:
            assert 0 <= c["num_tokens"] <= 6 and (c["finish_reason"] != "length" or c["num_tokens"] == 6)
    report = json.loads((out / "generate_report.json").read_text())
    assert report["prompts"] == 2 and report["samples"] == 4 and report["data"]["rejected"] == {"too_long": 1}
    rejects = [json.loads(x) for x in (out / "rejected_records.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["where"].endswith("p.jsonl:2")
    # same seed, same samples
    first = (out / "generations.jsonl").read_text()
    assert main(args + ["data.on_error=skip"]) == 0
    assert (out / "generations.jsonl").read_text() == first
