"""Objective mechanisms: loss mixing, extra loss terms, LD-DPO, WPO, unpaired data, stateful
losses across resume, and inputs that are missing failing before training starts."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt import DPOConfig, DPOTrainer
from prefopt.data.collate import PaddedCollator
from prefopt.data.schema import Origin
from prefopt.data.tokenize import EncodedExample
from prefopt.errors import ConfigError, DataError
from prefopt.logps import SequenceScores, prefix_logps, sequence_scores
from prefopt.objective import Objective

from helpers import first_step_gradient

FIXTURES = Path(__file__).parent / "fixtures"
SHORT = dict(max_length=64, max_prompt_length=32, logging_steps=1, progress_bar=False, max_grad_norm=None)


def trainer(tiny_model_dir, data, out, extra_losses=None, **kw):
    return DPOTrainer(str(tiny_model_dir), None, train_dataset=data, extra_losses=extra_losses,
                      args=DPOConfig(output_dir=str(out), **{**SHORT, **kw}))


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_mixed_objective_gradient_is_the_weighted_sum(tiny_model_dir, demo_records, tmp_path):
    data = demo_records[:6]
    g = {}
    for name, loss in (("dpo", "dpo"), ("sft", "sft"),
                       ("mix", [{"name": "dpo", "weight": 0.8}, {"name": "sft", "weight": 0.2}])):
        g[name] = first_step_gradient(trainer(tiny_model_dir, data, tmp_path / name, loss=loss,
                                              per_device_train_batch_size=3, gradient_accumulation_steps=2))
    assert torch.allclose(g["mix"], 0.8 * g["dpo"] + 0.2 * g["sft"], atol=1e-6, rtol=1e-4)


def test_extra_loss_terms_are_added_logged_and_normalised_per_micro_batch(tiny_model_dir, demo_records, tmp_path):
    def penalty(step):  # e.g. a constraint on the chosen likelihood: mean NLL of the chosen
        return -step.inputs.policy_chosen_logps.mean() * 0.01

    grads = [first_step_gradient(trainer(tiny_model_dir, demo_records[:8], tmp_path / f"{mb}", {"penalty": penalty},
                                         per_device_train_batch_size=mb, gradient_accumulation_steps=8 // mb))
             for mb in (8, 2)]
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)  # averaged over micro-batches, not summed
    plain = first_step_gradient(trainer(tiny_model_dir, demo_records[:8], tmp_path / "plain",
                                        per_device_train_batch_size=8))
    assert not torch.allclose(grads[0], plain)
    t = trainer(tiny_model_dir, demo_records[:8], tmp_path / "run", {"penalty": penalty}, max_steps=2,
                per_device_train_batch_size=4)
    t.train()
    row = metrics(tmp_path / "run")[0]
    assert row["loss/penalty"] == pytest.approx(-0.01 * row["logps/chosen"], rel=1e-5)
    assert row["loss"] == pytest.approx(row["loss/dpo"] + row["loss/penalty"], rel=1e-5)
    with pytest.raises(Exception, match="must return a scalar tensor"):
        trainer(tiny_model_dir, demo_records[:4], tmp_path / "bad", {"bad": lambda s: s.inputs.policy_chosen_logps},
                max_steps=1).train()


def _pair_batch():
    o = Origin("t", 0)
    ex = [EncodedExample([1], {"chosen": [5, 6, 7], "rejected": [8, 9]}, o),
          EncodedExample([1, 2], {"chosen": [5], "rejected": [6, 7, 8, 9]}, o)]
    return PaddedCollator(0, ("chosen", "rejected"))(ex)


def test_prefix_logps_and_ld_dpo_hand_values():
    batch = _pair_batch()  # sequences: chosen0 (3), chosen1 (1), rejected0 (2), rejected1 (4)
    token_logps = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0])
    assert batch.token_sequence.tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 3, 3]
    scores = SequenceScores(torch.zeros(4).index_add(0, batch.token_sequence, token_logps), batch.sequence_lengths,
                            torch.zeros(4), torch.zeros(4), token_logps=token_logps)
    assert scores.logps.tolist() == [-6.0, -4.0, -11.0, -34.0]
    assert prefix_logps(scores, batch, torch.tensor([2, 1, 2, 1])).tolist() == [-3.0, -4.0, -11.0, -7.0]
    # LD-DPO, alpha = 0.5: pair 0 shares 2 tokens: chosen -3 + 0.5 * -3 = -4.5, rejected -11 (no rest);
    # pair 1 shares 1 token: chosen -4, rejected -7 + 0.5 * (-8 - 9 - 10) = -20.5
    from prefopt.losses import LossInputs
    from prefopt.losses.modifiers import MODIFIERS, ModifierContext
    ld = MODIFIERS["ld_alpha"].adjust_inputs(LossInputs(), ModifierContext(batch, scores, scores), 0.5)
    assert ld.policy_chosen_logps.tolist() == [-4.5, -4.0] and ld.policy_rejected_logps.tolist() == [-11.0, -20.5]
    assert ld.ref_chosen_logps.tolist() == [-4.5, -4.0]


def test_wpo_weight_matches_naive():
    batch = _pair_batch()
    torch.manual_seed(0)
    logits = torch.randn(len(batch.token_row), 11) * 2
    scores = sequence_scores(logits, batch, token_stats=("wpo_adjusted_logp",))
    logprobs = logits.log_softmax(-1)
    picked = logprobs.gather(-1, batch.token_target[:, None]).squeeze(-1)
    adjusted = picked - torch.log((logprobs.exp() ** 2).sum(-1))
    expected = torch.zeros(4).index_add(0, batch.token_sequence, adjusted) / batch.sequence_lengths
    assert torch.allclose(scores.stats["wpo_adjusted_logp"] / batch.sequence_lengths, expected, atol=1e-5)


def test_ld_and_wpo_modifiers_train_end_to_end(tiny_model_dir, demo_records, tmp_path):
    t = trainer(tiny_model_dir, demo_records[:8], tmp_path, max_steps=2, per_device_train_batch_size=4,
                loss={"name": "ipo", "ld_alpha": 0.5, "wpo": True})
    t.train()
    row = metrics(tmp_path)[0]
    assert 0 < row["wpo/weight"] <= 1 and math.isfinite(row["loss"])
    with pytest.raises(ConfigError, match="apply to paired losses"):
        trainer(tiny_model_dir, demo_records[:4], tmp_path / "x", loss={"name": "kto", "wpo": True})


def test_kto_on_real_unpaired_data_reports_balance_and_kl(tiny_model_dir, tmp_path):
    t = trainer(tiny_model_dir, str(FIXTURES / "kto_en_demo_20.json"), tmp_path, max_steps=3,
                per_device_train_batch_size=4, loss="kto", learning_rate=1e-3)
    t.train()
    report = json.loads((tmp_path / "data_report.json").read_text())[0]
    assert report["format"] == "messages_label" and report["desirable"] == 10 and report["undesirable"] == 10
    rows = metrics(tmp_path)
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # policy == reference: 1 - sigmoid(0) for everyone
    assert rows[0]["kl"] == 0.0 and {"rewards/chosen", "rewards/rejected", "logps/chosen"} <= rows[0].keys()
    assert "rewards/accuracies" not in rows[0]  # no pairs: no accuracy


def test_kto_trains_on_one_example_micro_batches(tiny_model_dir, tmp_path):
    """The mismatched pair is a role of each example (the next example's completion), so a
    micro-batch of one still estimates z0; at step 0 policy == reference gives 1 - σ(0)."""
    t = trainer(tiny_model_dir, str(FIXTURES / "kto_en_demo_20.json"), tmp_path, max_steps=2,
                per_device_train_batch_size=1, loss="kto")
    t.train()
    assert metrics(tmp_path)[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    examples = t._train_set.examples
    assert examples[0].completions["kl"] == examples[1].completions["completion"]


def test_tdpo_starts_at_ln2_with_the_reference_copy(tiny_model_dir, demo_records, tmp_path):
    trainer(tiny_model_dir, demo_records[:4], tmp_path, max_steps=1, per_device_train_batch_size=4,
            loss="tdpo2").train()
    assert metrics(tmp_path)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_stateful_loss_state_survives_resume(tiny_model_dir, demo_records, tmp_path):
    """bco_pair keeps a running reward mean: resuming must restore it to give identical weights."""
    common = dict(max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3, loss="bco_pair")
    trainer(tiny_model_dir, demo_records[:8], tmp_path / "full", save_steps=2, **common).train()
    trainer(tiny_model_dir, demo_records[:8], tmp_path / "resumed",
            resume_from=str(tmp_path / "full" / "checkpoints" / "step-2"), **common).train()
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_column_fails_before_training_naming_file_and_column(tiny_model_dir, demo_records, tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(demo_records[:4], indent=1))  # the first record starts on line 2
    with pytest.raises(DataError, match=r"pairs.json:2: .*missing column 'preference_prob', which the loss needs"):
        trainer(tiny_model_dir, str(path), tmp_path / "o", loss="soft_dpo", max_steps=1).train()
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_missing_reference_fails_before_training(tiny_model_dir, demo_records, tmp_path):
    with pytest.raises(ConfigError, match="needs a reference model, but reference.strategy is 'none'"):
        trainer(tiny_model_dir, demo_records[:4], tmp_path, reference={"strategy": "none"}).train()


def test_slic_uses_ref_completion_rows_only_where_present(tiny_model_dir, tmp_path):
    # (long enough that the ref_completion, a cut rejected, is not truncated to the rejected's ids)
    t = trainer(tiny_model_dir, str(FIXTURES / "scored_pairs.jsonl"), tmp_path, max_steps=1,
                per_device_train_batch_size=4, loss="slic", max_examples=4, max_length=256, max_prompt_length=128)
    job = t.setup()
    batch = next(iter(job.train_loader))
    index = {k: v.tolist() for k, v in batch.index.items()}
    # records 0 and 2 carry a ref_completion (own rows), records 1 and 3 reuse their chosen row
    with_ref = [i for i in range(4) if index["ref_completion"][i] not in index["chosen"]]
    reused = [i for i in range(4) if index["ref_completion"][i] == index["chosen"][i]]
    assert len(with_ref) == 2 and len(reused) == 2 and batch.num_sequences == 10


def test_micro_batches_by_count_by_token_budget_and_grouped_by_length():
    from prefopt.train.batches import EpochSampler, MicroBatchSampler

    lengths = [5, 30, 12, 7, 40, 3, 22, 9, 15]
    by_count = list(MicroBatchSampler(EpochSampler(9, seed=0), 4))
    assert [len(b) for b in by_count] == [4, 4, 1] and sorted(sum(by_count, [])) == list(range(9))
    budget = MicroBatchSampler(EpochSampler(9, seed=0), 4, lengths, max_tokens=45)
    batches = list(budget)
    assert sum(batches, []) == sum(by_count, [])  # same order, other cuts
    assert all(sum(lengths[i] for i in b) <= 45 or len(b) == 1 for b in batches) and len(budget) == len(batches)
    # several processes: accelerate deals the budget batches whole, every example trains once
    from accelerate.data_loader import BatchSamplerShard
    shards = [list(BatchSamplerShard(MicroBatchSampler(EpochSampler(9, seed=0), 4, lengths, max_tokens=45), 2, p))
              for p in range(2)]
    dealt = [b for round_ in zip(*shards) for b in round_]
    assert all(b in batches for b in dealt) and len(shards[0]) == len(shards[1])
    assert set(sum(dealt, [])) == set(range(9))
    grouped = EpochSampler(9, seed=0, lengths=lengths, window=4)
    order = list(grouped)
    assert sorted(order) == list(range(9))
    for s in range(0, 9, 4):  # each window longest first, windows from the same permutation
        window = order[s:s + 4]
        assert [lengths[i] for i in window] == sorted((lengths[i] for i in window), reverse=True)
        assert set(window) == set(list(EpochSampler(9, seed=0))[s:s + 4])


def test_kto_with_a_one_example_tail_trains_through_the_epoch(tiny_model_dir, tmp_path):
    # 9 unpaired examples, batches of 4: 4 + 4 + 1; the last example still has its mismatched pair
    t = trainer(tiny_model_dir, str(FIXTURES / "kto_en_demo_20.json"), tmp_path, num_train_epochs=1,
                per_device_train_batch_size=4, loss="kto", max_examples=9)
    t.train()
    assert [r["step"] for r in metrics(tmp_path) if "loss" in r] == [1, 2, 3]


def test_slic_compute_falls_back_to_the_chosen_like_the_collator():
    from prefopt import losses
    kw = dict(policy_chosen_logps=torch.tensor([-4.0]), policy_rejected_logps=torch.tensor([-6.0]),
              chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([3]))
    implicit = losses.compute("slic", **kw).losses
    explicit = losses.compute("slic", **kw, policy_ref_completion_logps=kw["policy_chosen_logps"],
                              ref_completion_lengths=kw["chosen_lengths"]).losses
    # max(0, 1 - (-4) + (-6)) + 0.5 * 4 = 0 + 2
    assert implicit.item() == explicit.item() == pytest.approx(2.0)


def test_loss_record_checks_report_bad_pairs_at_load_time(tiny_model_dir, tmp_path):
    rows = [{"prompt": "Q1", "chosen": " a", "rejected": " b", "score_chosen": 8, "score_rejected": 3,
             "preference_prob": 0.7},
            {"prompt": "Q2", "chosen": " c", "rejected": " d", "score_chosen": 4, "score_rejected": 4,
             "preference_prob": 1.5}]
    path = tmp_path / "scored.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: .*needs score_chosen > score_rejected, got 4 and 4"):
        trainer(tiny_model_dir, str(path), tmp_path / "o", loss="odpo", max_steps=1).train()
    with pytest.raises(DataError, match=rf"{path}:2: .*preference_prob must lie in \[0, 1\], got 1.5"):
        trainer(tiny_model_dir, str(path), tmp_path / "o", loss="soft_dpo", max_steps=1).train()
    t = trainer(tiny_model_dir, str(path), tmp_path / "skip", loss="odpo", max_steps=1, on_error="skip")
    t.setup()
    assert t.job is not None and len(t._train_set) == 1
    assert dict(t._train_set.report.rejected) == {"invalid_column": 1}
