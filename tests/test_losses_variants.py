"""Hand-derived values for the reference-based variants (prefopt/losses/variants.py).

Every test uses pairs whose log-ratios are small integers, writes the arithmetic in a comment,
and checks the loss against an independent computation with the `math` module. Notation:
r_w = log πθ(y_w) − log πref(y_w), r_l likewise, h = r_w − r_l, sp(x) = log(1 + e^x).
"""
import math

import pytest
import torch

from prefopt import losses
from prefopt.errors import ConfigError
from prefopt.losses import MissingInputError

T = torch.tensor
TOL = 1e-6


def sp(x: float) -> float:
    return math.log1p(math.exp(x)) if x < 30 else x + math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logsig(x: float) -> float:
    return -sp(-x)


def pairs(**over) -> dict:
    # Pair A: chosen -10 (ref -12), rejected -15 (ref -14): r_w = 2, r_l = -1, h = 3, 5 and 3 tokens.
    # Pair B: chosen -8 (ref -7), rejected -9 (ref -6): r_w = -1, r_l = -3, h = 2, 2 and 4 tokens.
    kw = dict(policy_chosen_logps=T([-10.0, -8.0]), policy_rejected_logps=T([-15.0, -9.0]),
              ref_chosen_logps=T([-12.0, -7.0]), ref_rejected_logps=T([-14.0, -6.0]),
              chosen_lengths=T([5, 2]), rejected_lengths=T([3, 4]))
    kw.update(over)
    return kw


R_W, R_L = (2.0, -1.0), (-1.0, -3.0)  # (r_w, r_l) of pairs A and B
H = (3.0, 2.0)


def all_inputs(**over) -> dict:
    """Pairs A and B with every LossInputs field and column set (unused ones must be ignored)."""
    kw = pairs(chosen_seq_kl=T([0.1, 0.2]), rejected_seq_kl=T([0.3, 0.1]),
               policy_logps=T([-1.0, -2.0]), ref_logps=T([-1.5, -2.5]), lengths=T([3, 4]),
               labels=T([True, False]), policy_kl_logps=T([-3.0, -4.0]), ref_kl_logps=T([-3.0, -4.0]),
               policy_ref_completion_logps=T([-10.0, -8.0]), ref_completion_lengths=T([5, 2]),
               preference_prob=T([0.9, 0.7]), score_chosen=T([8.0, 7.0]), score_rejected=T([3.0, 6.5]),
               margin=T([0.5, 0.0]))
    kw.update(over)
    return kw


def approx(values):
    return pytest.approx(list(values), abs=TOL)


def dpo(**kw):
    return losses.compute("dpo", **kw).losses


VARIANTS = ["hinge", "robust", "dpop", "odpo", "sppo_hard", "nca_pair", "apo_zero", "apo_down", "exo_pair",
            "bco_pair", "aot", "aot_unpaired", "discopop", "sigmoid_norm"]


# ---------------------------------------------------------------------------------- hinge
def test_hinge_hand_derived():
    # beta = 0.1: A: 1 - 0.1*3 = 0.7; B: 1 - 0.1*2 = 0.8
    out = losses.compute("hinge", **pairs(), beta=0.1)
    assert out.losses.tolist() == approx([max(0.0, 1 - 0.1 * h) for h in H])
    assert out.losses.tolist() == approx([0.7, 0.8])
    assert out.chosen_rewards.tolist() == approx([0.2, -0.1])
    assert out.rejected_rewards.tolist() == approx([-0.1, -0.3])


def test_hinge_is_flat_past_the_margin():
    # beta = 0.5: A: 1 - 1.5 < 0 -> 0; B: 1 - 1.0 = 0 -> 0, and no gradient
    kw = pairs(policy_chosen_logps=T([-10.0, -8.0], requires_grad=True))
    out = losses.compute("hinge", **kw, beta=0.5)
    assert out.losses.tolist() == [0.0, 0.0]
    out.losses.sum().backward()
    assert kw["policy_chosen_logps"].grad.tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------- robust
def test_robust_hand_derived():
    # eps = 0.1: A: (0.9*sp(-0.3) - 0.1*sp(0.3))/0.8 = (0.498920 - 0.085436)/0.8 = 0.516855
    #            B: (0.9*sp(-0.2) - 0.1*sp(0.2))/0.8 = (0.538325 - 0.079814)/0.8 = 0.573139
    out = losses.compute("robust", **pairs(), beta=0.1, label_smoothing=0.1)
    assert out.losses.tolist() == approx([(0.9 * sp(-0.1 * h) - 0.1 * sp(0.1 * h)) / 0.8 for h in H])
    assert out.losses.tolist() == approx([0.516855, 0.573139])


def test_robust_with_eps_zero_is_dpo_and_rdpo_alias():
    assert losses.get_spec("rdpo") is losses.get_spec("robust")
    got = losses.compute("rdpo", **pairs(), label_smoothing=0.0).losses
    assert torch.allclose(got, dpo(**pairs()), atol=TOL)


def test_robust_swap_costs_beta_h_over_one_minus_two_eps():
    # L(h) - L(-h) = -beta*h/(1 - 2 eps): A: 0.3/0.6 = 0.5, B: 0.2/0.6 = 1/3; unlike cDPO it can go negative
    kw = pairs()
    swapped = pairs(policy_chosen_logps=kw["policy_rejected_logps"], policy_rejected_logps=kw["policy_chosen_logps"],
                    ref_chosen_logps=kw["ref_rejected_logps"], ref_rejected_logps=kw["ref_chosen_logps"])
    a = losses.compute("robust", **kw, label_smoothing=0.2).losses
    b = losses.compute("robust", **swapped, label_smoothing=0.2).losses
    assert (b - a).tolist() == approx([0.5, 1 / 3])
    big = losses.compute("robust", **pairs(policy_chosen_logps=T([100.0, 100.0])), label_smoothing=0.2).losses
    assert (big < 0).all()


# ---------------------------------------------------------------------------------- dpop
def test_dpop_hand_derived():
    # lambda = 2: A: r_w = 2 >= 0, no penalty: sp(-0.3) = 0.554355 (DPO)
    #             B: r_w = -1, penalty 1: -log sigmoid(0.1*(2 - 2*1)) = log 2 = 0.693147
    out = losses.compute("dpop", **pairs(), beta=0.1, dpop_lambda=2.0)
    assert out.losses.tolist() == approx([sp(-0.3), math.log(2)])
    assert out.losses.tolist() == approx([0.554355, 0.693147])
    assert out.metrics["dpop/penalty"].tolist() == [0.0, 1.0]


def test_dpop_equals_dpo_with_lambda_zero_or_when_the_chosen_gained_probability():
    assert torch.allclose(losses.compute("dpop", **pairs(), dpop_lambda=0.0).losses, dpo(**pairs()), atol=TOL)
    # chosen policy >= reference in both pairs (r_w = 2 and 0): the penalty is 0 for any lambda
    kw = pairs(policy_chosen_logps=T([-10.0, -7.0]))
    assert torch.allclose(losses.compute("dpop", **kw, dpop_lambda=50.0).losses, dpo(**kw), atol=TOL)
    assert losses.get_spec("dpop").make_params({}).dpop_lambda == 50.0  # the paper's value


# ---------------------------------------------------------------------------------- odpo
def test_odpo_hand_derived_from_scores():
    # A: delta = log(8 - 3) = log 5 = 1.609438, L = sp(1.609438 - 0.3) = log(1 + 3.704091) = 1.548433
    # B: delta = log(7 - 6.5) = log 0.5 = -0.693147, L = sp(-0.693147 - 0.2) = log(1 + 0.5 e^-0.2) = 0.343140
    out = losses.compute("odpo", **pairs(), score_chosen=T([8.0, 7.0]), score_rejected=T([3.0, 6.5]), beta=0.1)
    assert out.losses.tolist() == approx([sp(math.log(5) - 0.3), sp(math.log(0.5) - 0.2)])
    assert out.losses.tolist() == approx([1.548433, 0.343140])
    assert out.metrics["odpo/offset"].tolist() == approx([math.log(5), math.log(0.5)])
    # alpha = 2 doubles the offset: A: sp(2 log 5 - 0.3) = log(1 + 25 e^-0.3)
    out = losses.compute("odpo", **pairs(), score_chosen=T([8.0, 7.0]), score_rejected=T([3.0, 6.5]), alpha=2.0)
    assert out.losses[0].item() == pytest.approx(math.log(1 + 25 * math.exp(-0.3)), abs=TOL)


def test_odpo_hand_derived_from_margin():
    # margins [0.5, 0]: A: sp(0.5 - 0.3) = sp(0.2) = 0.798139; B: sp(-0.2) = 0.598139 (DPO)
    out = losses.compute("odpo", **pairs(), margin=T([0.5, 0.0]), offset="margin")
    assert out.losses.tolist() == approx([sp(0.2), sp(-0.2)])
    assert out.losses.tolist() == approx([0.798139, 0.598139])


def test_odpo_with_zero_offset_is_dpo():
    zero_margin = losses.compute("odpo", **pairs(), margin=T([0.0, 0.0]), offset="margin").losses
    zero_alpha = losses.compute("odpo", **pairs(), score_chosen=T([8.0, 7.0]), score_rejected=T([3.0, 6.5]),
                                alpha=0.0).losses
    assert torch.allclose(zero_margin, dpo(**pairs()), atol=TOL)
    assert torch.allclose(zero_alpha, dpo(**pairs()), atol=TOL)


def test_odpo_columns_follow_the_offset_parameter():
    spec = losses.get_spec("odpo")
    assert spec.needed_columns(spec.make_params({})) == ("score_chosen", "score_rejected")
    assert spec.needed_columns(spec.make_params({"offset": "margin"})) == ("margin",)
    with pytest.raises(MissingInputError, match="score_rejected"):
        losses.compute("odpo", **pairs(), score_chosen=T([8.0, 7.0]))
    with pytest.raises(MissingInputError, match="margin"):
        losses.compute("odpo", **pairs(), score_chosen=T([8.0, 7.0]), score_rejected=T([3.0, 6.5]), offset="margin")
    with pytest.raises(ConfigError, match="alpha"):
        losses.compute("odpo", **pairs(), margin=T([0.0, 0.0]), offset="margin", alpha=2.0)


@pytest.mark.parametrize("rejected", [[3.0, 7.0], [3.0, 9.0]], ids=["tie", "reversed"])
def test_odpo_raises_when_the_chosen_does_not_score_higher(rejected):
    with pytest.raises(ValueError, match=r"score_chosen > score_rejected.*#1.*margin"):
        losses.compute("odpo", **pairs(), score_chosen=T([8.0, 7.0]), score_rejected=T(rejected))


def test_odpo_log_ratio_offset_hand_derived():
    # offset: log_ratio, alpha = 1: A: h = 3, scores 8 and 2: delta = log 4, L = sp(log 4 - 0.3) = log(1 + 4 e^-0.3)
    #                                B: h = 2, scores 7 and 3.5: delta = log 2, L = log(1 + 2 e^-0.2)
    out = losses.compute("odpo", **pairs(), score_chosen=T([8.0, 7.0]), score_rejected=T([2.0, 3.5]),
                         offset="log_ratio")
    assert out.losses.tolist() == approx([math.log1p(4 * math.exp(-0.3)), math.log1p(2 * math.exp(-0.2))])
    assert out.losses.tolist() == approx([1.377070, 0.969817])
    assert out.metrics["odpo/offset"].tolist() == approx([math.log(4), math.log(2)])
    # scale-free: ratings x10 give the same offset (the log-difference one grows by log 10)
    tenfold = losses.compute("odpo", **pairs(), score_chosen=T([80.0, 70.0]), score_rejected=T([20.0, 35.0]),
                             offset="log_ratio")
    assert torch.allclose(tenfold.losses, out.losses, atol=TOL)
    # a chosen scored lower gives a negative offset (allowed); alpha = 2 doubles it
    low = losses.compute("odpo", **pairs(), score_chosen=T([2.0, 7.0]), score_rejected=T([8.0, 3.5]),
                         offset="log_ratio", alpha=2.0)
    assert low.metrics["odpo/offset"].tolist() == approx([2 * math.log(0.25), 2 * math.log(2)])


def test_odpo_difference_offset_hand_derived():
    # offset: difference, alpha = 0.5: A: scores 8 and 3: delta = 2.5, L = sp(2.5 - 0.3) = sp(2.2) = 2.305083
    #                                  B: scores 7 and 6.5: delta = 0.25, L = sp(0.25 - 0.2) = sp(0.05) = 0.718460
    out = losses.compute("odpo", **pairs(), score_chosen=T([8.0, 7.0]), score_rejected=T([3.0, 6.5]),
                         offset="difference", alpha=0.5)
    assert out.losses.tolist() == approx([sp(2.2), sp(0.05)])
    assert out.losses.tolist() == approx([2.305083, 0.718460])


@pytest.mark.parametrize("offset, chosen, rejected, needs", [
    ("log_ratio", [8.0, 0.0], [2.0, 1.0], "score_chosen > 0 and score_rejected > 0"),
    ("log_ratio", [8.0, 3.0], [2.0, -1.0], "score_chosen > 0 and score_rejected > 0"),
    ("difference", [8.0, float("nan")], [2.0, 1.0], "finite scores"),
])
def test_odpo_score_offsets_refuse_scores_they_cannot_use(offset, chosen, rejected, needs):
    with pytest.raises(ValueError, match=rf"offset: {offset}\) needs {needs}.*#1"):
        losses.compute("odpo", **pairs(), score_chosen=T(chosen), score_rejected=T(rejected), offset=offset)
    spec = losses.get_spec("odpo")
    params = spec.make_params({"offset": offset})
    assert spec.needed_columns(params) == ("score_chosen", "score_rejected")
    problem = spec.record_check({"score_chosen": chosen[1], "score_rejected": rejected[1]}, params)
    assert problem and needs in problem
    assert spec.record_check({"score_chosen": 8.0, "score_rejected": 2.0}, params) is None


# ---------------------------------------------------------------------------------- sppo_hard
def test_sppo_hard_hand_derived():
    # beta = 0.1, targets +-5: A: (2 - 5)^2 + (-1 + 5)^2 = 9 + 16 = 25; B: (-1 - 5)^2 + (-3 + 5)^2 = 36 + 4 = 40
    out = losses.compute("sppo_hard", **pairs(), beta=0.1)
    assert out.losses.tolist() == approx([(rw - 5) ** 2 + (rl + 5) ** 2 for rw, rl in zip(R_W, R_L)])
    assert out.losses.tolist() == approx([25.0, 40.0])
    # beta = 0.5, targets +-1: A: 1 + 0 = 1; B: 4 + 4 = 8
    assert losses.compute("sppo_hard", **pairs(), beta=0.5).losses.tolist() == approx([1.0, 8.0])


# ---------------------------------------------------------------------------------- nca_pair
def test_nca_pair_hand_derived():
    # A: beta r = 0.2, -0.1: sp(-0.2) + sp(0.2)/2 + sp(-0.1)/2 = 0.598139 + 0.399069 + 0.322198 = 1.319407
    # B: beta r = -0.1, -0.3: sp(0.1) + sp(-0.1)/2 + sp(-0.3)/2 = 0.744397 + 0.322198 + 0.277178 = 1.343773
    out = losses.compute("nca_pair", **pairs(), beta=0.1)
    expected = [sp(-0.1 * rw) + 0.5 * sp(0.1 * rw) + 0.5 * sp(0.1 * rl) for rw, rl in zip(R_W, R_L)]
    assert out.losses.tolist() == approx(expected)
    assert out.losses.tolist() == approx([1.319407, 1.343773])


# ---------------------------------------------------------------------------------- apo
def test_apo_zero_hand_derived():
    # A: sigmoid(-0.2) + sigmoid(-0.1) = 0.450166 + 0.475021 = 0.925187
    # B: sigmoid(0.1) + sigmoid(-0.3) = 0.524979 + 0.425557 = 0.950537
    out = losses.compute("apo_zero", **pairs(), beta=0.1)
    assert out.losses.tolist() == approx([(1 - sig(0.1 * rw)) + sig(0.1 * rl) for rw, rl in zip(R_W, R_L)])
    assert out.losses.tolist() == approx([0.925187, 0.950537])


def test_apo_down_hand_derived():
    # A: sigmoid(0.2) + 1 - sigmoid(0.3) = 0.549834 + 0.425557 = 0.975391
    # B: sigmoid(-0.1) + 1 - sigmoid(0.2) = 0.475021 + 0.450166 = 0.925187
    out = losses.compute("apo_down", **pairs(), beta=0.1)
    assert out.losses.tolist() == approx([sig(0.1 * rw) + (1 - sig(0.1 * h)) for rw, h in zip(R_W, H)])
    assert out.losses.tolist() == approx([0.975391, 0.925187])


# ---------------------------------------------------------------------------------- exo_pair
def exo(z: float, eps: float) -> float:
    return sig(z) * (math.log(sig(z)) - math.log(1 - eps)) + sig(-z) * (math.log(sig(-z)) - math.log(eps))


def test_exo_pair_hand_derived():
    # eps = 1e-3, A: z = 0.3: 0.574443*(-0.554355 + 0.001001) + 0.425557*(-0.854355 + 6.907755)
    #                      = -0.317870 + 2.576070 = 2.258199
    #             B: z = 0.2: 0.549834*(-0.598139 + 0.001001) + 0.450166*(-0.798139 + 6.907755) = 2.422015
    out = losses.compute("exo_pair", **pairs(), beta=0.1)  # default eps = 1e-3
    assert out.losses.tolist() == approx([exo(0.1 * h, 1e-3) for h in H])
    assert out.losses.tolist() == approx([2.258199, 2.422015])


def test_exo_pair_at_h_zero_and_its_minimum():
    # h = 0: 1/2 (log 1/2 - log(1-eps)) + 1/2 (log 1/2 - log eps) = -log 2 - 1/2 log(eps (1-eps))
    #      = -0.693147 + 3.453878 + 0.000500 = 2.761231 at eps = 1e-3
    logps = T([-3.0, -40.0])
    out = losses.compute("exo_pair", policy_chosen_logps=logps, policy_rejected_logps=logps - 2,
                         ref_chosen_logps=logps, ref_rejected_logps=logps - 2)
    assert out.losses.tolist() == approx([-math.log(2) - 0.5 * math.log(1e-3 * (1 - 1e-3))] * 2)
    assert out.losses.tolist() == approx([2.761231] * 2)
    # the minimum, 0, is at sigmoid(beta h) = 1 - eps: beta h = log((1 - eps)/eps); eps = 0.2: log 4, h = 10 log 4
    h = 10 * math.log(4)
    out = losses.compute("exo_pair", policy_chosen_logps=T([h]), policy_rejected_logps=T([0.0]),
                         ref_chosen_logps=T([0.0]), ref_rejected_logps=T([0.0]), label_smoothing=0.2)
    assert out.losses.item() == pytest.approx(0.0, abs=TOL)


def test_exo_pair_rejects_eps_zero():
    with pytest.raises(ConfigError, match="label_smoothing=0.0 must be > 0"):
        losses.compute("exo_pair", **pairs(), label_smoothing=0.0)


# ---------------------------------------------------------------------------------- bco_pair
def test_bco_pair_running_mean_across_two_calls():
    # Call 1 (pairs A, B): rewards [0.2, -0.1] and [-0.1, -0.3], mean -0.3/4 = -0.075 -> delta = -0.075
    #   A: sp(-(0.2 + 0.075)) + sp(-0.1 + 0.075) = 0.565071 + 0.680725 = 1.245796
    #   B: sp(-(-0.1 + 0.075)) + sp(-0.3 + 0.075) = 0.705725 + 0.586962 = 1.292687
    state: dict = {}
    out = losses.compute("bco_pair", **pairs(), beta=0.1, state=state)
    assert out.losses.tolist() == approx([sp(-0.275) + sp(-0.025), sp(0.025) + sp(-0.225)])
    assert out.losses.tolist() == approx([1.245796, 1.292687])
    assert state["count"] == 4 and state["mean"] == pytest.approx(-0.075, abs=TOL)
    # Call 2 (one pair r_w = 3, r_l = 1: rewards 0.3, 0.1, batch mean 0.2), same state:
    #   delta = (4*(-0.075) + 2*0.2)/6 = 0.1/6 = 0.016667; L = sp(-(0.3 - d)) + sp(0.1 - d) = 0.561482 + 0.735682
    out = losses.compute("bco_pair", policy_chosen_logps=T([-4.0]), policy_rejected_logps=T([-5.0]),
                         ref_chosen_logps=T([-7.0]), ref_rejected_logps=T([-6.0]), beta=0.1, state=state)
    d = (4 * -0.075 + 2 * 0.2) / 6
    assert out.losses.tolist() == approx([sp(-(0.3 - d)) + sp(0.1 - d)])
    assert out.losses.item() == pytest.approx(1.297164, abs=TOL)
    assert state["count"] == 6 and state["mean"] == pytest.approx(d, abs=TOL)
    assert out.metrics["bco/delta"].item() == pytest.approx(d, abs=TOL)


def test_bco_pair_without_shared_state_uses_the_batch_mean():
    # compute() gives a fresh state: delta = batch mean both times, so the two calls agree
    a, b = losses.compute("bco_pair", **pairs()).losses, losses.compute("bco_pair", **pairs()).losses
    assert torch.equal(a, b) and a.tolist() == approx([1.245796, 1.292687])
    assert losses.get_spec("bco_pair").stateful


def test_bco_pair_delta_is_the_mean_of_all_rewards_seen():
    # 2 + 3 pairs in two calls = one call with all 5 pairs, as far as the final delta goes
    kw = dict(policy_chosen_logps=T([-1.0, -4.0, -2.0, -9.0, -3.0]),
              policy_rejected_logps=T([-6.0, -2.0, -7.0, -1.0, -5.0]),
              ref_chosen_logps=T([-3.0] * 5), ref_rejected_logps=T([-2.0] * 5))
    split: dict = {}
    losses.compute("bco_pair", **{k: v[:2] for k, v in kw.items()}, state=split)
    losses.compute("bco_pair", **{k: v[2:] for k, v in kw.items()}, state=split)
    whole: dict = {}
    losses.compute("bco_pair", **kw, state=whole)
    assert split["count"] == whole["count"] == 10 and float(split["mean"]) == pytest.approx(float(whole["mean"]), abs=1e-12)


# ---------------------------------------------------------------------------------- aot
def aot_pairs() -> dict:
    # pair 1: chosen -10 (ref -12), rejected -15 (ref -11): u = 5, v = -1, r_w = 2, r_l = -4, h = 6
    # pair 2: chosen -8 (ref -7), rejected -9 (ref -9):     u = 1, v = 2,  r_w = -1, r_l = 0, h = -1
    return dict(policy_chosen_logps=T([-10.0, -8.0]), policy_rejected_logps=T([-15.0, -9.0]),
                ref_chosen_logps=T([-12.0, -7.0]), ref_rejected_logps=T([-11.0, -9.0]))


def test_aot_hand_derived_sorts_policy_and_reference_margins():
    # sort(u) = [1, 5], sort(v) = [-1, 2], delta = [2, 3]: [sp(-0.2), sp(-0.3)] = [0.598139, 0.554355]
    out = losses.compute("aot", **aot_pairs(), beta=0.1)
    assert out.losses.tolist() == approx([sp(-0.2), sp(-0.3)])
    assert out.losses.tolist() == approx([0.598139, 0.554355])
    assert dpo(**aot_pairs()).tolist() == approx([sp(-0.6), sp(0.1)])  # per pair, DPO differs
    assert out.chosen_rewards.tolist() == approx([0.2, -0.1])  # rewards stay per pair
    # label smoothing eps = 0.1: 0.9 sp(-0.2) + 0.1 sp(0.2)
    out = losses.compute("aot", **aot_pairs(), label_smoothing=0.1)
    assert out.losses[0].item() == pytest.approx(0.9 * sp(-0.2) + 0.1 * sp(0.2), abs=TOL)


def test_aot_unpaired_hand_derived_sorts_chosen_and_rejected_rewards():
    # r_w = [2, -1] -> [-1, 2]; r_l = [-4, 0] -> [-4, 0]; delta = [3, 2]: [sp(-0.3), sp(-0.2)]
    out = losses.compute("aot_unpaired", **aot_pairs(), beta=0.1)
    assert out.losses.tolist() == approx([sp(-0.3), sp(-0.2)])
    assert out.losses.tolist() == approx([0.554355, 0.598139])


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_aot_with_batch_of_one_is_dpo(name):
    for i in range(2):
        one = {k: v[i:i + 1] for k, v in pairs().items()}
        assert torch.allclose(losses.compute(name, **one).losses, dpo(**one), atol=TOL)


def test_aot_is_batch_level():
    # the same first pair gets a different loss when its batch-mate changes
    kw = aot_pairs()
    other = dict(kw, policy_rejected_logps=T([-15.0, -30.0]))
    assert losses.compute("aot", **kw).losses[1] != losses.compute("aot", **other).losses[1]


# ---------------------------------------------------------------------------------- discopop
def disco(z: float, tau: float = 0.05) -> float:
    return (1 - sig(z / tau)) * sp(-z) + sig(z / tau) * math.exp(-z)


def test_discopop_hand_derived():
    # tau = 0.05, A: z = 0.3: m = sigmoid(6) = 0.997527: 0.002473*0.554355 + 0.997527*0.740818 = 0.740357
    #             B: z = 0.2: m = sigmoid(4) = 0.982014: 0.017986*0.598139 + 0.982014*0.818731 = 0.814763
    out = losses.compute("discopop", **pairs(), beta=0.1)
    assert out.losses.tolist() == approx([disco(0.1 * h) for h in H])
    assert out.losses.tolist() == approx([0.740357, 0.814763])
    assert losses.get_spec("lrml") is losses.get_spec("discopop")


def test_discopop_limits_and_non_monotonicity():
    def at(z, tau=0.05):  # beta = 1, h = z
        return losses.compute("discopop", policy_chosen_logps=T([z]), policy_rejected_logps=T([0.0]),
                              ref_chosen_logps=T([0.0]), ref_rejected_logps=T([0.0]), beta=1.0, tau=tau).losses.item()
    # z = 0: m = 1/2: log(2)/2 + 1/2 = 0.846574
    assert at(0.0) == pytest.approx(0.5 * math.log(2) + 0.5, abs=TOL)
    # z << 0: m = sigmoid(-200) ~ 0, L = sp(10) = 10.000045 (DPO's logistic loss at z = -10)
    assert at(-10.0) == pytest.approx(sp(10.0), abs=TOL)
    assert at(-10.0, tau=0.01) == pytest.approx(-logsig(-10.0), abs=TOL)
    # z >> 0: m ~ 1, L = e^-z
    assert at(5.0) == pytest.approx(math.exp(-5.0), abs=TOL)
    # near 0 the blend is not monotone: L(0.05) = 0.875181 > L(-0.05) = 0.807966
    assert at(0.05) == pytest.approx(0.875181, abs=TOL) and at(-0.05) == pytest.approx(0.807966, abs=TOL)


@pytest.mark.parametrize("z", [1e4, -1e4])
def test_discopop_finite_and_differentiable_at_extreme_margins(z):
    # TRL's literal exp(-z)*sigmoid(z/tau) is inf*0 = NaN at z = -1e4; here L = sp(1e4) = 1e4 there, 0 at z = 1e4
    pc = T([z], requires_grad=True)
    out = losses.compute("discopop", policy_chosen_logps=pc, policy_rejected_logps=T([0.0]),
                         ref_chosen_logps=T([0.0]), ref_rejected_logps=T([0.0]), beta=1.0)
    assert torch.isfinite(out.losses).all()
    assert out.losses.item() == pytest.approx(max(0.0, -z), rel=1e-6)
    out.losses.sum().backward()
    assert torch.isfinite(pc.grad).all()
    # dL/dz = -sigmoid(-z) from the logistic part: -1 at z = -1e4, 0 at z = 1e4
    assert pc.grad.item() == pytest.approx(-1.0 if z < 0 else 0.0, abs=TOL)


def test_discopop_tau_must_be_below_one():
    with pytest.raises(ConfigError, match="tau=1.0 must be < 1"):
        losses.compute("discopop", **pairs(), tau=1.0)


# ---------------------------------------------------------------------------------- sigmoid_norm
def test_sigmoid_norm_hand_derived():
    # beta = 5 (default). A: r_w/5 = 0.4, r_l/3 = -1/3, h = 0.733333: sp(-3.666667) = 0.025240
    #                     B: r_w/2 = -0.5, r_l/4 = -0.75, h = 0.25: sp(-1.25) = 0.251929
    out = losses.compute("sigmoid_norm", **pairs())
    assert out.losses.tolist() == approx([sp(-5 * (2 / 5 + 1 / 3)), sp(-5 * (-1 / 2 + 3 / 4))])
    assert out.losses.tolist() == approx([0.025240, 0.251929])
    assert out.chosen_rewards.tolist() == approx([5 * 0.4, 5 * -0.5])  # the length-normalised reward


def test_sigmoid_norm_needs_lengths():
    kw = pairs()
    kw.pop("rejected_lengths")
    with pytest.raises(MissingInputError, match="rejected_lengths"):
        losses.compute("sigmoid_norm", **kw)


def test_sigmoid_norm_with_one_token_completions_is_dpo_at_the_same_beta():
    kw = pairs(chosen_lengths=T([1, 1]), rejected_lengths=T([1, 1]))
    assert torch.allclose(losses.compute("sigmoid_norm", **kw, beta=0.1).losses, dpo(**kw), atol=TOL)


# ---------------------------------------------------------------------------------- all of them
# Value at pi_theta = pi_ref (r_w = r_l = 0) with default parameters, derived per loss.
AT_REFERENCE = {
    "hinge": 1.0,                                             # max(0, 1 - 0)
    "robust": math.log(2),                                    # ((1-e) log 2 - e log 2)/(1-2e)
    "dpop": math.log(2),                                      # no penalty
    "odpo": None,                                             # sp(delta): depends on the scores
    "sppo_hard": 1 / (2 * 0.1 ** 2),                          # 2 * (1/(2 beta))^2 = 50
    "nca_pair": 2 * math.log(2),                              # log 2 + log 2/2 + log 2/2
    "apo_zero": 1.0,                                          # 1/2 + 1/2
    "apo_down": 1.0,                                          # 1/2 + 1/2
    "exo_pair": -math.log(2) - 0.5 * math.log(1e-3 * (1 - 1e-3)),
    "bco_pair": 2 * math.log(2),                              # delta = 0
    "aot": math.log(2),
    "aot_unpaired": math.log(2),
    "discopop": 0.5 * math.log(2) + 0.5,
    "sigmoid_norm": math.log(2),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_value_when_policy_equals_reference(name):
    logps = T([-3.0, -50.0, -700.0])
    kw = dict(policy_chosen_logps=logps, policy_rejected_logps=logps - 7, ref_chosen_logps=logps,
              ref_rejected_logps=logps - 7, chosen_lengths=T([1, 20, 300]), rejected_lengths=T([2, 30, 400]),
              score_chosen=T([2.0, 3.0, 4.0]), score_rejected=T([1.0, 1.0, 1.0]))
    out = losses.compute(name, **kw)
    # odpo: delta = log(s_w - s_l) = log [1, 2, 3], L = sp(delta) = log(1 + [1, 2, 3])
    expected = [math.log(2), math.log(3), math.log(4)] if name == "odpo" else [AT_REFERENCE[name]] * 3
    assert out.losses.tolist() == approx(expected)


@pytest.mark.parametrize("name", VARIANTS)
def test_accepts_every_input_and_returns_one_loss_per_pair(name):
    out = losses.compute(name, **all_inputs())
    assert out.losses.shape == (2,) and torch.isfinite(out.losses).all()
    assert out.chosen_rewards.shape == out.rejected_rewards.shape == (2,)


@pytest.mark.parametrize("name", VARIANTS)
def test_finite_losses_and_gradients_at_extreme_log_probs(name):
    big, tiny = -1e4, -1e-4
    pc = T([tiny, big, big, tiny], requires_grad=True)
    pr = T([big, tiny, big, tiny], requires_grad=True)
    out = losses.compute(name, policy_chosen_logps=pc, policy_rejected_logps=pr,
                         ref_chosen_logps=T([big, tiny, tiny, big]), ref_rejected_logps=T([tiny, big, big, tiny]),
                         chosen_lengths=T([1, 2000, 1, 7]), rejected_lengths=T([2000, 1, 1, 3]),
                         score_chosen=T([1e4, 2.0, 1.0 + 1e-6, 5.0]), score_rejected=T([0.0, 1.0, 1.0, -5.0]))
    assert torch.isfinite(out.losses).all(), out.losses
    out.losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_documented_with_paper_equation_and_hand_check(name):
    spec = losses.get_spec(name)
    assert "arXiv:" in spec.paper and spec.equation and spec.summary
    assert "hand check" in spec.fn.__doc__.lower()
    assert all(text.strip() for _, _, text in spec.param_docs())
    assert spec.needs_reference(spec.make_params({}))


def test_cli_shows_paper_equation_and_params(capsys):
    from prefopt.cli import main

    assert main(["losses", "hinge"]) == 0
    text = capsys.readouterr().out
    assert "max(0, 1 − β h)" in text and "arXiv:2309.06657" in text and "beta = 0.1" in text
    assert main(["losses", "rdpo"]) == 0
    assert "label_smoothing = 0.1" in capsys.readouterr().out
