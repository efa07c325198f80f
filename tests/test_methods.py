"""Multi-round methods on the tiny model: SPIN's rejected responses are the round-t model's own
samples, sDPO's reference for step k is step k-1's model, iterative DPO pairs follow the judge,
self-rewarding scores are expected scores, and empty rounds stop with a clear message."""
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from prefopt.cli import main
from prefopt.config import GenerateConfig, ModelConfig
from prefopt.data.report import DataReport
from prefopt.generate import TransformersSampler, encode_prompts, generate, load_inference_model
from prefopt.judges import SelfJudge, judge_all
from prefopt.methods.iterative import make_pairs
from prefopt.models import load_tokenizer
from prefopt.reference.precomputed import weights_fingerprint

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "prefopt" / "demo" / "data" / "dpo_en_demo.json"
SMALL = ["data.max_length=96", "data.max_prompt_length=48", "train.progress_bar=false", "train.max_steps=1",
         "train.per_device_train_batch_size=2", "train.learning_rate=1e-3", "generate.max_new_tokens=6",
         "generate.seed=5"]


def records(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(json.loads(DATA.read_text())[:n]))
    return path


def fingerprint(path) -> str:
    return weights_fingerprint(load_inference_model(ModelConfig(name_or_path=str(path))), sharded=False)


def regenerate(model_path, prompts, settings: dict, seed: int):
    tok = load_tokenizer(str(model_path))
    cfg = GenerateConfig(**{k: settings[k] for k in ("num_samples", "max_new_tokens", "temperature", "top_p", "top_k",
                                                     "stop", "batch_size")})
    gens = encode_prompts(prompts, tok, 96, cfg.max_new_tokens, DataReport("prompts"), max_prompt_length=48)
    sampler = TransformersSampler(load_inference_model(ModelConfig(name_or_path=str(model_path))), tok)
    return generate(sampler, gens, cfg, seed, progress=False)


def test_spin_rejected_are_the_round_models_own_samples(tiny_model_dir, tmp_path):
    out = tmp_path / "spin"
    assert main(["spin", f"model.name_or_path={tiny_model_dir}", f"data.train={records(tmp_path, 4)}",
                 f"output_dir={out}", "spin.iterations=2", *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2] and summary["final_model"] == str(out / "iter-2" / "final")
    starts = [tiny_model_dir, out / "iter-1" / "final"]
    for t, start in enumerate(starts, start=1):
        folder = out / f"iter-{t}"
        pairs = [json.loads(x) for x in (folder / "pairs.jsonl").read_text().splitlines()]
        gens = [json.loads(x) for x in (folder / "generations.jsonl").read_text().splitlines()]
        again = regenerate(start, [g["prompt"] for g in gens], gens[0]["sampling"], seed=5 + t - 1)
        assert [[c["text"] for c in g["completions"]] for g in gens] == [[s.text for s in g.samples] for g in again]
        # chosen: the data's response; rejected: that sample (empty samples and copies of the target make none)
        demo = json.loads(DATA.read_text())[:4]
        want = [(r["chosen"]["value"], g["completions"][0]["text"]) for r, g in zip(demo, gens)
                if g["completions"][0]["text"].strip() and g["completions"][0]["text"].strip() != r["chosen"]["value"]]
        assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == want
        assert len(pairs) + summary["rounds"][t - 1]["empty_generation"] + \
            summary["rounds"][t - 1]["identical_to_target"] == len(gens)
        assert summary["rounds"][t - 1]["started_from"] == str(start)
        assert summary["rounds"][t - 1]["reference_weights"] == fingerprint(start)  # reference = round t's model
        assert (folder / "final" / "model.safetensors").is_file()
    assert fingerprint(out / "iter-1" / "final") != fingerprint(tiny_model_dir)


def test_stepwise_reference_of_step_k_is_step_k_minus_1(tiny_model_dir, tmp_path):
    out = tmp_path / "sdpo"
    assert main(["stepwise", f"model.name_or_path={tiny_model_dir}", f"data.train={records(tmp_path, 6)}",
                 f"output_dir={out}", "stepwise.chunks=2", *SMALL]) == 0
    rounds = json.loads((out / "summary.json").read_text())["rounds"]
    assert [len((out / f"iter-{k}" / "pairs.jsonl").read_text().splitlines()) for k in (1, 2)] == [3, 3]
    assert rounds[0]["reference_weights"] == fingerprint(tiny_model_dir)
    assert rounds[1]["reference_weights"] == fingerprint(out / "iter-1" / "final")
    assert rounds[1]["reference_weights"] != rounds[0]["reference_weights"]


def test_make_pairs_orders_by_the_judge():
    texts, scores = ["a", "bb", "ccc", "dd"], [0.5, 2.0, None, 1.0]
    assert make_pairs("p", texts, scores, "best_worst", 0.0) == [
        {"prompt": "p", "chosen": "bb", "rejected": "a", "score_chosen": 2.0, "score_rejected": 0.5}]
    got = make_pairs("p", texts, scores, "all", 0.6)
    assert [(x["chosen"], x["rejected"]) for x in got] == [("bb", "dd"), ("bb", "a")]  # by rank; dd-a: gap 0.5
    assert make_pairs("p", ["x", "x"], [1.0, 0.0], "all", 0.0) == []          # identical texts never pair
    assert make_pairs("p", ["x", " "], [1.0, 0.0], "all", 0.0) == []          # an empty sample makes no pair
    assert make_pairs([{"role": "user", "content": "q"}], ["y", "z"], [1.0, 0.0], "best_worst", 0.0)[0]["chosen"] == \
        [{"role": "assistant", "content": "y"}]


def _judge_len(prompt, completion):
    if "!" in completion:
        raise ValueError("no exclamations")
    return len(completion)


def test_iterative_dpo_pairs_follow_the_judge_and_reference_can_stay_initial(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "judge_mod_it", types.SimpleNamespace(score=_judge_len))
    out = tmp_path / "iter"
    assert main(["iterative", f"model.name_or_path={tiny_model_dir}", f"data.train={records(tmp_path, 3)}",
                 f"output_dir={out}", "iterative.iterations=2", "generate.num_samples=3", "generate.temperature=1.5",
                 "iterative.reference=initial", "iterative.judge={name: python, function: 'judge_mod_it:score'}",
                 *SMALL]) == 0
    rounds = json.loads((out / "summary.json").read_text())["rounds"]
    for t in (1, 2):
        judged = [json.loads(x) for x in (out / f"iter-{t}" / "judgements.jsonl").read_text().splitlines()]
        pairs = [json.loads(x) for x in (out / f"iter-{t}" / "pairs.jsonl").read_text().splitlines()]
        by_source: dict = {}
        for j in judged:
            by_source.setdefault(j["record_index"], []).append(j)
            assert (j["score"] is None) == ("!" in j["completion"])
            assert j["score"] is None or j["score"] == len(j["completion"])
        for p in pairs:
            assert p["score_chosen"] > p["score_rejected"] and len(p["chosen"][0]["content"]) == p["score_chosen"]
        scored = [[s["score"] for s in group if s["score"] is not None] for group in by_source.values()]
        best = sorted(max(g) for g in scored if len(g) > 1 and max(g) > min(g))  # best_worst, min_gap 0
        assert sorted(p["score_chosen"] for p in pairs) == best
        assert rounds[t - 1]["reference_weights"] == fingerprint(tiny_model_dir)  # reference: initial
        assert rounds[t - 1]["judge"] == "python judge_mod_it:score"


def test_a_round_without_pairs_stops_naming_it(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "empty"
    assert main(["iterative", f"model.name_or_path={tiny_model_dir}", f"data.train={records(tmp_path, 2)}",
                 f"output_dir={out}", "generate.num_samples=2", "iterative.judge={name: regex, pattern: zzzz}",
                 *SMALL]) == 2
    err = capsys.readouterr().err
    assert "round 1 produced no pairs" in err and str(out / "iter-1") in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"][0]["stopped"] == "no pairs" and (out / "iter-1" / "generations.jsonl").is_file()


def test_self_judge_expected_score_by_hand(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_inference_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    digits = [d for d in range(10) if len(tok(str(d), add_special_tokens=False)["input_ids"]) == 1]
    assert len(digits) >= 3
    judge = SelfJudge(model, tok, scores=digits[:3])
    prompts, answers = ["What is 2+2?", [{"role": "user", "content": "Hi"}]], ["4", "Hello there, friend"]
    got = judge_all(judge, prompts, answers)
    for p, a, score in zip(prompts, answers, got.scores):
        ids = judge.judge_prompt(p, a)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        token_ids = [tok(str(d), add_special_tokens=False)["input_ids"][0] for d in digits[:3]]
        p_scores = logits[token_ids].softmax(-1)
        assert score == pytest.approx(float(sum(d * q for d, q in zip(digits[:3], p_scores))), abs=1e-5)


METHOD_VERBS = {"generate.yaml": "generate", "spin.yaml": "spin", "iterative.yaml": "iterative",
                "self_rewarding.yaml": "iterative", "sdpo.yaml": "stepwise"}


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "methods").glob("*.yaml")))
def test_shipped_method_config_runs_on_the_tiny_model(name, tiny_model_dir, tmp_path):
    """Every configs/methods/ recipe runs as shipped (model, output and size overridden)."""
    from prefopt.config import load_config

    path = ROOT / "configs" / "methods" / name
    shipped = load_config(path)
    data = [f"data.train={ROOT / shipped.data.train}"] if shipped.data.train else []
    prompts = [f"generate.prompts={ROOT / shipped.generate.prompts}"] if shipped.generate.prompts else []
    args = [METHOD_VERBS[name], str(path), f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path}",
            *data, *prompts, "data.max_examples=6", "data.max_length=96", "data.max_prompt_length=48",
            "generate.max_new_tokens=8", "train.max_steps=1", "train.per_device_train_batch_size=2",
            "train.progress_bar=false", "spin.iterations=1", "iterative.iterations=1", "iterative.min_gap=-1"]
    assert main(args) == 0
    if METHOD_VERBS[name] == "generate":
        assert (tmp_path / "generations.jsonl").is_file()
    else:
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["rounds"] and Path(summary["final_model"], "model.safetensors").is_file()


def test_self_judge_parse_mode_reads_the_first_score_or_records_a_failure(tiny_model_dir, monkeypatch):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_inference_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    judge = SelfJudge(model, tok, mode="parse", max_new_tokens=4)
    answers = iter(["Score 4 of 5", "I think 9 then 2", "no idea"])

    def fake_generate(input_ids, attention_mask, **kw):  # the model "answers" these texts, one per item
        texts = [next(answers) for _ in range(len(input_ids))]
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(map(len, ids))
        tail = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
        return torch.cat([input_ids, tail], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    got = judge_all(judge, ["q1", "q2", "q3"], ["a", "b", "c"])
    assert got.scores[:2] == [4.0, 2.0] and got.scores[2] is None      # 9 is not a score of 1..5
    assert got.failures[0][0] == 2 and "no score in the answer" in got.failures[0][1]
