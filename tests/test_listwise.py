"""K responses per prompt (listwise): formats, roles and collated tensors, the listwise losses'
hand-derived values and their K = 2 reductions, bad records with file:line, the layouts'
agreement, and a 2-step training run from a shipped recipe.

Every loss here (prefopt.losses.listwise) also runs in tests/test_loss_invariants.py (on pairs,
K = 2) and has its hand check below: "plackett_luce", "dpo_multi_rejected", "infonca", "nca",
"lipo", "exo".
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefopt import losses
from prefopt.config import DataConfig, load_config
from prefopt.data.collate import make_collator
from prefopt.data.formats import detect_majority
from prefopt.data.pipeline import load_examples
from prefopt.data.report import DataReport
from prefopt.data.roles import expand_roles
from prefopt.data.schema import Origin, RankedExample
from prefopt.data.tokenize import EncodedExample, Encoder, response_roles
from prefopt.errors import DataError
from prefopt.losses import get_spec
from prefopt.models import build_tiny_model
from prefopt.objective import Objective, Term

from helpers import FrozenReference, step_in_each_layout

ROOT = Path(__file__).resolve().parents[1]
T = torch.tensor
O = Origin("t", 0)
LISTWISE = ["plackett_luce", "dpo_multi_rejected", "infonca", "nca", "lipo", "exo"]


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


# ------------------------------------------------------------------------------ formats
def test_formats_are_detected_and_sorted_best_first():
    ranked = {"prompt": "Q", "responses": ["b", "a", "c"], "scores": [2, 3, 1]}
    several = {"prompt": "Q", "chosen": "a", "rejected": ["b", "c"]}
    conv_pair = {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "a"}],
                 "rejected": [{"role": "assistant", "content": "b"}]}  # one conversational rejected
    assert detect_majority([ranked]).format.name == "ranked"
    assert detect_majority([several]).format.name == "multi_rejected"
    assert detect_majority([conv_pair]).format.name == "conversational"
    cfg = DataConfig()
    (ex,) = load_examples([ranked], cfg, DataReport("train", "raise"))
    assert isinstance(ex, RankedExample) and ex.responses == ["a", "b", "c"]
    assert ex.ranking.scores == (3.0, 2.0, 1.0) and ex.ranking.explicit
    (ex,) = load_examples([several], cfg, DataReport("train", "raise"))
    assert ex.responses == ["a", "b", "c"] and ex.ranking.scores == (1.0, 0.0, 0.0) and not ex.ranking.explicit
    conv = {"prompt": [{"role": "user", "content": "Q"}], "chosen": {"role": "assistant", "content": "a"},
            "rejected": [[{"role": "assistant", "content": "b"}], [{"role": "assistant", "content": "c"}]]}
    assert detect_majority([conv]).format.name == "multi_rejected"
    (ex,) = load_examples([conv], cfg, DataReport("train", "raise"))
    assert ex.responses[2] == [{"role": "assistant", "content": "c"}]


def test_a_k3_record_is_encoded_with_one_role_per_response(tokenizer):
    record = {"prompt": "Question: why? Answer:", "responses": [" second", " best", " worst"], "scores": [2, 3, 1]}
    (ex,) = load_examples([record], DataConfig(), DataReport("train", "raise"))
    enc = Encoder(tokenizer, 64).encode(ex, DataReport("train", "raise"))
    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer("Question: why? Answer:")["input_ids"]
    assert enc.prompt_ids == prompt_ids
    for role, text in zip(response_roles(3), [" best", " second", " worst"]):
        full = tokenizer("Question: why? Answer:" + text)["input_ids"]
        assert enc.completions[role] == full[len(prompt_ids):] + [eos]
    assert enc.extras["scores"] == [3.0, 2.0, 1.0]


def two_lists() -> list[EncodedExample]:
    """A: K = 3 (prompt [11, 12]); B: K = 2 (prompt [13]), padded to the objective's K = 3."""
    a = EncodedExample([11, 12], {"response_0": [21, 2], "response_1": [31, 32, 2], "response_2": [41, 2]}, O,
                       extras={"scores": [3.0, 2.0, 1.0]})
    b = EncodedExample([13], {"response_0": [51, 2], "response_1": [61, 2]}, O, extras={"scores": [1.0, 0.0]})
    return expand_roles([a, b], response_roles(3))


def test_padded_layout_exact_tensors():
    batch = make_collator("padded", 0, response_roles(3))(two_lists())
    assert batch.input_ids.tolist() == [[11, 12, 21, 2, 0],
                                        [13, 51, 2, 0, 0],
                                        [11, 12, 31, 32, 2],
                                        [13, 61, 2, 0, 0],   # B's response_1, also its padding response_2
                                        [11, 12, 41, 2, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0],
                                             [1, 1, 1, 1, 0]]
    assert batch.token_row.tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]
    assert batch.token_pos.tolist() == [1, 2, 0, 1, 1, 2, 3, 0, 1, 1, 2]
    assert batch.token_target.tolist() == [21, 2, 51, 2, 31, 32, 2, 61, 2, 41, 2]
    assert batch.token_sequence.tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]
    assert batch.sequence_lengths.tolist() == [2, 2, 3, 2, 2]
    assert {r: v.tolist() for r, v in batch.index.items()} == {"response_0": [0, 1], "response_1": [2, 3],
                                                                "response_2": [4, 3]}
    assert batch.response_scores.tolist() == [[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]]
    assert batch.response_mask.tolist() == [[True, True, True], [True, True, False]]


def test_shared_layout_exact_tensors_encode_the_prompt_once():
    batch = make_collator("shared", 0, response_roles(3))(two_lists())
    assert batch.input_ids.tolist() == [[11, 12, 21, 2, 31, 32, 2, 41, 2],   # prompt [11, 12] once, 3 branches
                                        [13, 51, 2, 61, 2, 0, 0, 0, 0]]
    att = batch.attention
    assert att.branch.tolist() == [[0, 0, 1, 1, 2, 2, 2, 3, 3], [0, 1, 1, 2, 2, 0, 0, 0, 0]]
    assert att.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4, 2, 3], [0, 1, 2, 1, 2, 0, 1, 2, 3]]
    assert att.segment.tolist() == [[0] * 9, [0, 0, 0, 0, 0, -1, -1, -1, -1]]
    assert att.units == [[(0, 2, (2, 3, 2))], [(0, 1, (2, 2))]]
    assert batch.token_row.tolist() == [0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0]
    assert batch.token_pos.tolist() == [1, 2, 0, 1, 1, 4, 5, 0, 3, 1, 7]  # the last prompt position predicts
    assert batch.token_target.tolist() == [21, 2, 51, 2, 31, 32, 2, 61, 2, 41, 2]  # every first token
    assert batch.token_sequence.tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]
    assert batch.response_mask.tolist() == [[True, True, True], [True, True, False]]


# ------------------------------------------------------------------------------ hand-derived values
# The module's example: β = 0.1, r = (2, −1, 0.5) → u = (0.2, −0.1, 0.05); scores (3, 1, 2).
LIST = dict(policy_response_logps=T([[-10.0, -15.0, -12.0]]), ref_response_logps=T([[-12.0, -14.0, -12.5]]),
            response_lengths=T([[3, 4, 5]]), response_scores=T([[3.0, 1.0, 2.0]]),
            response_mask=T([[True, True, True]]))
U = (0.2, -0.1, 0.05)


def value(name, **kw):
    return losses.compute(name, **{**LIST, **kw}).losses.item()


def test_plackett_luce_hand_value():
    # ranking y1 > y3 > y2: −(u1 − lse(u1, u3, u2)) − (u3 − lse(u3, u2))
    want = -(0.2 - lse(0.2, 0.05, -0.1)) - (0.05 - lse(0.05, -0.1))
    assert want == pytest.approx(1.577055, abs=1e-6)
    assert value("plackett_luce", beta=0.1) == pytest.approx(want, abs=1e-6)


def test_dpo_multi_rejected_hand_value():
    want = lse(*U) - 0.2
    assert want == pytest.approx(0.956098, abs=1e-6)
    assert value("dpo_multi_rejected", beta=0.1) == pytest.approx(want, abs=1e-6)


def test_infonca_and_nca_hand_values():
    z = math.exp(3) + math.exp(1) + math.exp(2)
    t = [math.exp(3) / z, math.exp(1) / z, math.exp(2) / z]          # (0.665241, 0.090031, 0.244728)
    log_p = [u - lse(*U) for u in U]
    infonca = -sum(ti * lp for ti, lp in zip(t, log_p))
    nca = sum(ti * sp(-u) + sp(u) / 3 for ti, u in zip(t, U))        # −log σ(x) = sp(−x)
    assert infonca == pytest.approx(1.019817, abs=1e-6) and nca == pytest.approx(1.348848, abs=1e-6)
    assert value("infonca", beta=0.1, alpha=1.0) == pytest.approx(infonca, abs=1e-6)
    assert value("nca", beta=0.1, alpha=1.0) == pytest.approx(nca, abs=1e-6)


def test_lipo_hand_value():
    # labels (1, 0, 0.5): gains (1, 0, √2 − 1); ranks by u: (1, 3, 2) → 1/log2(1 + τ) = (1, 0.5, 1/log2 3)
    g = [1.0, 0.0, math.sqrt(2) - 1]
    inv = [1.0, 0.5, 1 / math.log2(3)]
    want = sum(abs(g[i] - g[j]) * abs(inv[i] - inv[j]) * sp(-(U[i] - U[j])) for i, j in ((0, 1), (0, 2), (2, 1)))
    assert want == pytest.approx(0.445103, abs=1e-6)
    assert value("lipo", beta=0.1, response_scores=T([[1.0, 0.0, 0.5]])) == pytest.approx(want, abs=1e-6)


def test_exo_hand_value():
    log_p = [u - lse(*U) for u in U]
    log_q = [s - lse(3.0, 1.0, 2.0) for s in (3.0, 1.0, 2.0)]
    want = sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))
    assert want == pytest.approx(0.216825, abs=1e-6)
    assert value("exo", beta=0.1, beta_r=1.0) == pytest.approx(want, abs=1e-6)


def test_at_policy_equal_reference():
    same = dict(ref_response_logps=LIST["policy_response_logps"])
    assert value("plackett_luce", **same) == pytest.approx(math.log(6), abs=1e-6)   # log K!
    assert value("dpo_multi_rejected", **same) == pytest.approx(math.log(3), abs=1e-6)
    assert value("nca", **same) == pytest.approx(2 * math.log(2), abs=1e-6)


# ------------------------------------------------------------------------------ K = 2
PAIRS = dict(policy_chosen_logps=T([-10.0, -20.0, -5.0]), policy_rejected_logps=T([-20.0, -35.0, -9.0]),
             ref_chosen_logps=T([-15.0, -25.0, -7.0]), ref_rejected_logps=T([-15.0, -30.0, -8.0]))


def as_lists(scores=(1.0, 0.0)) -> dict:
    return dict(policy_response_logps=torch.stack([PAIRS["policy_chosen_logps"], PAIRS["policy_rejected_logps"]], 1),
                ref_response_logps=torch.stack([PAIRS["ref_chosen_logps"], PAIRS["ref_rejected_logps"]], 1),
                response_scores=T([list(scores)] * 3), response_mask=torch.ones(3, 2, dtype=torch.bool))


def k2(name, scores=(1.0, 0.0), **params):
    return losses.compute(name, **as_lists(scores), **params).losses


def pair(name, **params):
    return losses.compute(name, **PAIRS, **params).losses


def test_k2_plackett_luce_and_multi_rejected_equal_dpo():
    dpo = pair("dpo", beta=0.1)
    assert torch.allclose(k2("plackett_luce", beta=0.1), dpo, atol=1e-6)
    assert torch.allclose(k2("dpo_multi_rejected", beta=0.1), dpo, atol=1e-6)
    assert torch.allclose(k2("infonca", (1.0, 0.0), beta=0.1, alpha=1e-3), dpo, atol=1e-6)  # one-hot target


def test_k2_nca_equals_nca_pair_and_exo_equals_exo_pair():
    assert torch.allclose(k2("nca", (1.0, 0.0), beta=0.1, alpha=1e-3), pair("nca_pair", beta=0.1), atol=1e-6)
    eps = 1e-3  # softmax(s/β_r) = (1 − ε, ε) when s_w − s_l = β_r·log((1 − ε)/ε)
    got = k2("exo", (2.0 * math.log((1 - eps) / eps), 0.0), beta=0.1, beta_r=2.0)
    assert torch.allclose(got, pair("exo_pair", beta=0.1, label_smoothing=eps), atol=1e-5)


def test_k2_lipo_is_dpo_scaled_by_its_lambda_weight():
    assert torch.allclose(k2("lipo", beta=0.1), (1 - 1 / math.log2(3)) * pair("dpo", beta=0.1), atol=1e-6)


@pytest.mark.parametrize("name", LISTWISE)
def test_a_padded_response_changes_nothing(name):
    """An example of K = 2 padded to K = 3 (mask False, any values there) loses what it loses alone."""
    alone = k2(name, (5.0, 1.0), beta=0.1)
    kw = as_lists((5.0, 1.0))
    pad = dict(policy_response_logps=torch.cat([kw["policy_response_logps"], T([[-99.0]] * 3)], 1),
               ref_response_logps=torch.cat([kw["ref_response_logps"], T([[3.0]] * 3)], 1),
               response_scores=torch.cat([kw["response_scores"], T([[0.0]] * 3)], 1),
               response_mask=torch.cat([kw["response_mask"], torch.zeros(3, 1, dtype=torch.bool)], 1))
    pad["policy_response_logps"].requires_grad_(True)
    out = losses.compute(name, **pad, beta=0.1)
    assert torch.allclose(out.losses, alone, atol=1e-6)
    out.losses.sum().backward()
    grad = pad["policy_response_logps"].grad
    assert torch.isfinite(grad).all() and (grad[:, 2] == 0).all()


# ------------------------------------------------------------------------------ bad input
RANKED = {"prompt": "P", "responses": ["x", "y"], "scores": [1, 0]}
SEVERAL = {"prompt": "P", "chosen": "x", "rejected": ["y"]}
BAD = [  # (a good record of the same format, or None: the bad one alone), bad record, loss, message
    (RANKED, {"prompt": "Q", "responses": ["a"], "scores": [1]}, "plackett_luce", "at least 2 responses, got 1"),
    (SEVERAL, {"prompt": "Q", "chosen": "a", "rejected": []}, "dpo_multi_rejected", "at least 2 responses, got 1"),
    (RANKED, {"prompt": "Q", "responses": ["a", "b"], "scores": [1]}, "lipo", "2 responses, 1 scores"),
    (RANKED, {"prompt": "Q", "responses": ["a", "b"], "scores": [1, float("nan")]}, "lipo", "scores[1] is nan"),
    (RANKED, {"prompt": "Q", "responses": ["a", "b", "c"], "scores": [2, 1, 1]}, "plackett_luce",
     "needs a strict ranking, but responses tie at score 1"),
    (SEVERAL, {"prompt": "Q", "chosen": "a", "rejected": ["b", "c"]}, "plackett_luce",
     "the rejected responses are not ranked among themselves"),
    (RANKED, {"prompt": "Q", "responses": ["a", "b", "c"], "scores": [2, 2, 1]}, "dpo_multi_rejected",
     "needs one best response, but two tie at the top score 2"),
    (None, {"prompt": "Q", "chosen": "a", "rejected": ["b", "c"]}, "infonca", "needs explicit rewards"),
    (RANKED, {"prompt": "Q", "responses": ["a", "b", "c"], "scores": [3, 2, 1]}, "plackett_luce:2",
     "3 responses, more than loss 'plackett_luce' takes (max_responses=2"),
]


@pytest.mark.parametrize("good, record, loss, message", BAD, ids=[b[3][:30] for b in BAD])
def test_bad_records_name_file_and_line(tmp_path, good, record, loss, message):
    """Each problem stops the run at its file:line (data.on_error: raise) or is a counted skip."""
    name, _, k = loss.partition(":")
    spec = get_spec(name)
    params = spec.make_params({"max_responses": int(k)} if k else {})
    path = tmp_path / "data.jsonl"
    lines = ([json.dumps(good)] if good else []) + [json.dumps(record)]  # json writes NaN as NaN
    path.write_text("\n".join(lines) + "\n")
    checks = (lambda columns: spec.record_check(columns, params),)
    with pytest.raises(DataError) as err:
        load_examples(str(path), DataConfig(), DataReport("train", "raise"), record_checks=checks)
    assert err.value.where == f"{path}:{len(lines)}" and message in err.value.problem, err.value.problem
    report = DataReport("train", "skip")
    examples = load_examples(str(path), DataConfig(), report, record_checks=checks)
    assert len(examples) == len(lines) - 1 and sum(report.rejected.values()) == 1
    assert report.rejects[0]["where"] == f"{path}:{len(lines)}"


def test_listwise_data_with_a_pairwise_loss_says_what_to_use(tiny_model_dir, tmp_path):
    from prefopt.errors import ConfigError
    from prefopt.trainer import Trainer
    config = load_config(ROOT / "configs" / "dpo.yaml",
                         [f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path}",
                          f"data.train={ROOT / 'tests/fixtures/listwise.jsonl'}", "data.eval_split_size=0"])
    with pytest.raises(ConfigError, match="K responses per prompt; use a listwise loss .*plackett_luce"):
        Trainer.from_config(config).setup()


# ------------------------------------------------------------------------------ layouts
def ranked_examples(vocab: int = 500) -> list[EncodedExample]:
    """Lists of 3, 2 and 4 responses of mixed lengths (4 = max_responses below)."""
    gen = torch.Generator().manual_seed(0)

    def ids(k):
        return torch.randint(5, vocab, (k,), generator=gen).tolist()

    shapes = [(6, (4, 7, 1)), (3, (5, 2)), (9, (3, 3, 6, 2))]
    out = []
    for prompt, lens in shapes:
        out.append(EncodedExample(ids(prompt), dict(zip(response_roles(len(lens)), map(ids, lens))), O,
                                  extras={"scores": [float(len(lens) - k) for k in range(len(lens))]}))
    return out


@pytest.fixture(scope="module")
def ref_model(tokenizer):
    model = build_tiny_model(len(tokenizer), hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64,
                             max_positions=256, seed=3)
    return model.eval()


@pytest.mark.parametrize("name", LISTWISE)
def test_listwise_losses_agree_across_layouts(ref_model, tiny_model_dir, name):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    policy.train()
    spec = get_spec(name)
    objective = Objective([Term(spec, spec.make_params({"max_responses": 4}), 1.0, name)], FrozenReference(ref_model))
    examples = expand_roles(ranked_examples(), objective.roles)
    results = step_in_each_layout(policy, objective, examples, name)
    want, want_grad, step, batch = results["padded"]
    metrics = objective.metrics(step, batch)
    assert torch.isfinite(want).all() and want_grad.abs().max() > 0
    assert metrics["rewards/accuracies"][1] == 3 + 1 + 6  # ordered pairs: 3 of K = 3, 1 of K = 2, 6 of K = 4
    assert "rewards/position_3" in metrics and metrics["rewards/position_3"][1] == 1
    for layout in ("packed", "shared"):
        got, grad, _, _ = results[layout]
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), layout
        assert torch.allclose(grad, want_grad, atol=1e-6, rtol=1e-3), layout


# ------------------------------------------------------------------------------ end to end
def test_two_steps_from_the_shipped_recipe(tiny_model_dir, tmp_path):
    from prefopt.trainer import Trainer
    path = ROOT / "configs" / "losses" / "dpo_multi_rejected.yaml"
    config = load_config(path, [f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path}",
                                f"data.train={ROOT / 'tests/fixtures/listwise.jsonl'}", "train.max_steps=2",
                                "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=1",
                                "train.eval_steps=0", "train.save_steps=0", "train.logging_steps=1",
                                "train.progress_bar=false", "data.max_length=64", "data.max_prompt_length=32",
                                "data.layout=shared"])
    Trainer.from_config(config).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    first = train[0]
    assert first["loss"] == pytest.approx(math.log(3), abs=1e-4)  # policy == reference at step 1: log K
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "rewards/position_0",
            "rewards/position_2", "logps/chosen", "logps/rejected"} <= first.keys()
    assert all(math.isfinite(r["loss"]) for r in train)
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert "multi_rejected" in json.dumps(report)


def test_review_fixes_cache_key_mixing_and_contradicting_scores(tokenizer, tmp_path):
    """Each listwise loss's record check has its own cache name (a lipo run's cache never lets a tie
    through plackett_luce); a listwise objective refuses a non-listwise term with a message; a pair
    whose scores contradict its labels is a bad record at its line."""
    from prefopt.config import DataConfig, parse_loss
    from prefopt.data.cache import check_name
    from prefopt.data.pipeline import prepare_datasets
    from prefopt.errors import ConfigError, DataError
    from prefopt.losses import get_spec
    from prefopt.objective import Objective

    names = {check_name(get_spec(n).record_check) for n in ("plackett_luce", "lipo", "dpo_multi_rejected")}
    assert len(names) == 3
    with pytest.raises(ConfigError, match=r"a listwise objective takes listwise losses only.*sft \(any\)"):
        Objective.from_config(parse_loss([{"name": "plackett_luce"}, {"name": "sft", "weight": 0.1}]), None)
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "q", "chosen": "good", "rejected": "bad", "score_chosen": 9, "score_rejected": 1}\n'
                    '{"prompt": "q", "chosen": "good", "rejected": "bad", "score_chosen": 2, "score_rejected": 7}\n')
    with pytest.raises(DataError, match=r"pairs.jsonl:2: .*score_chosen 2 is below score_rejected 7"):
        prepare_datasets(DataConfig(train=str(path)), tokenizer, "listwise", seed=0,
                         optional_columns=("score_chosen", "score_rejected"))
