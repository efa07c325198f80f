"""Hand-derived values for KTO (unpaired) and kto_pair, and KTO's z0 through the objective."""
import math

import pytest
import torch

from prefopt import losses
from prefopt.data.collate import PaddedCollator
from prefopt.data.roles import expand_roles
from prefopt.data.schema import Origin
from prefopt.data.tokenize import EncodedExample
from prefopt.errors import ConfigError
from prefopt.logps import score_batch
from prefopt.losses import MissingInputError, get_spec
from prefopt.objective import Objective, Term

from helpers import FrozenReference, TinyLM

T = torch.tensor


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# r = policy - ref = (2, -1, 3, 0.5); labels desirable, undesirable, undesirable, desirable
UNPAIRED = dict(policy_logps=T([-10.0, -12.0, -5.0, -7.5]), ref_logps=T([-12.0, -11.0, -8.0, -8.0]),
                labels=T([True, False, False, True]), lengths=T([4, 5, 6, 7]))
# mismatched-pair log-ratios (1, 2, -0.5, 0.5): mean 0.75
KL_PAIRS = dict(policy_kl_logps=T([-4.0, -6.0, -9.5, -3.5]), ref_kl_logps=T([-5.0, -8.0, -9.0, -4.0]))


def test_kto_zero_reference_point_hand_derived():
    # beta = 0.1, z0 = 0:
    #   desirable r = 2:     1 - sigma(0.1 * 2)        = 1 - sigma(0.2)  = 0.450166
    #   undesirable r = -1:  1 - sigma(0.1 * (0 + 1))  = 1 - sigma(0.1)  = 0.475021
    #   undesirable r = 3:   1 - sigma(0.1 * (0 - 3))  = 1 - sigma(-0.3) = 0.574443
    #   desirable r = 0.5:   1 - sigma(0.05)                             = 0.487503
    out = losses.compute("kto", **UNPAIRED, z0="zero")
    expected = [1 - sigmoid(0.2), 1 - sigmoid(0.1), 1 - sigmoid(-0.3), 1 - sigmoid(0.05)]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.losses.tolist() == pytest.approx([0.450166, 0.475021, 0.574443, 0.487503], abs=1e-6)
    assert out.metrics["kl"].item() == 0.0
    # rewards: beta * r of the desirable subset, then of the undesirable subset
    assert out.chosen_rewards.tolist() == pytest.approx([0.2, 0.05])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.3])


def test_kto_class_weights():
    # lambda_D = 4/3, lambda_U = 1 (the paper's upper recommendation when n_D = n_U)
    out = losses.compute("kto", **UNPAIRED, z0="zero", desirable_weight=4 / 3, undesirable_weight=1.0)
    expected = [4 / 3 * (1 - sigmoid(0.2)), 1 - sigmoid(0.1), 1 - sigmoid(-0.3), 4 / 3 * (1 - sigmoid(0.05))]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_kto_batch_reference_point_hand_derived():
    # z0 = max(0, mean(1, 2, -0.5, 0.5)) = 0.75
    #   desirable r = 2:     1 - sigma(0.1 (2 - 0.75))    = 1 - sigma(0.125) = 0.468791
    #   undesirable r = -1:  1 - sigma(0.1 (0.75 + 1))   = 1 - sigma(0.175)
    #   undesirable r = 3:   1 - sigma(0.1 (0.75 - 3))   = 1 - sigma(-0.225)
    #   desirable r = 0.5:   1 - sigma(0.1 (0.5 - 0.75)) = 1 - sigma(-0.025)
    out = losses.compute("kto", **UNPAIRED, **KL_PAIRS)
    expected = [1 - sigmoid(0.125), 1 - sigmoid(0.175), 1 - sigmoid(-0.225), 1 - sigmoid(-0.025)]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.losses[0].item() == pytest.approx(0.468791, abs=1e-6)
    assert out.metrics["kl"].item() == pytest.approx(0.75)


def test_kto_reference_point_is_clamped_at_zero_and_detached():
    # mismatched log-ratios (-1, -2, -0.5, -0.5): mean -1 -> z0 = 0, the same losses as z0 = zero
    pol = T([-6.0, -10.0, -9.5, -4.5], requires_grad=True)
    out = losses.compute("kto", **UNPAIRED, policy_kl_logps=pol, ref_kl_logps=T([-5.0, -8.0, -9.0, -4.0]))
    assert out.metrics["kl"].item() == 0.0
    assert torch.allclose(out.losses, losses.compute("kto", **UNPAIRED, z0="zero").losses)
    # with a positive z0 too, no gradient flows into the mismatched pairs
    pol = KL_PAIRS["policy_kl_logps"].clone().requires_grad_(True)
    policy = UNPAIRED["policy_logps"].clone().requires_grad_(True)
    out = losses.compute("kto", **{**UNPAIRED, "policy_logps": policy}, policy_kl_logps=pol,
                         ref_kl_logps=KL_PAIRS["ref_kl_logps"])
    out.losses.sum().backward()
    assert pol.grad is None or not pol.grad.any()
    assert policy.grad is not None and policy.grad.abs().min() > 0


def test_kto_batch_reference_point_from_a_single_example():
    # one example still has its mismatched pair (a role fixed per example): z0 = max(0, 1) = 1,
    # r = 2 (desirable): 1 - sigma(0.1 * (2 - 1)) = 0.475021
    one = {k: v[:1] for k, v in {**UNPAIRED, **KL_PAIRS}.items()}
    out = losses.compute("kto", **one)
    assert out.metrics["kl"].item() == pytest.approx(1.0) and out.losses.item() == pytest.approx(0.475021, abs=1e-6)
    assert torch.isfinite(losses.compute("kto", **one, z0="zero").losses).all()  # z0 = 0 needs no pairs


def test_kto_inputs_depend_on_z0():
    spec = get_spec("kto")
    assert set(spec.extra_inputs(spec.make_params({}))) == {"labels", "policy_kl_logps", "ref_kl_logps"}
    assert set(spec.extra_inputs(spec.make_params({"z0": "zero"}))) == {"labels"}
    with pytest.raises(MissingInputError, match="policy_kl_logps"):
        losses.compute("kto", **UNPAIRED)  # z0 = batch without the mismatched pairs
    with pytest.raises(ConfigError, match="z0='median' is not one of"):
        losses.compute("kto", **UNPAIRED, z0="median")
    assert spec.data == "unpaired" and spec.needs_reference(spec.params())


def test_kto_accepts_inputs_with_every_field_set_and_extremes():
    big, tiny = -1e4, -1e-4
    policy = T([tiny, big, big, tiny], requires_grad=True)
    out = losses.compute(
        "kto", policy_logps=policy, ref_logps=T([big, tiny, big, tiny]), lengths=T([1, 2000, 3, 4]),
        labels=T([True, False, True, False]), policy_kl_logps=T([big, tiny, tiny, big]),
        ref_kl_logps=T([tiny, big, tiny, big]),
        policy_chosen_logps=T([-1.0] * 4), policy_rejected_logps=T([-2.0] * 4), ref_chosen_logps=T([-1.0] * 4),
        ref_rejected_logps=T([-2.0] * 4), chosen_lengths=T([1] * 4), rejected_lengths=T([1] * 4),
        chosen_seq_kl=T([0.0] * 4), rejected_seq_kl=T([0.0] * 4), policy_ref_completion_logps=T([-1.0] * 4),
        ref_completion_lengths=T([1] * 4), extras={"margin": T([0.0] * 4)})
    assert torch.isfinite(out.losses).all()
    out.losses.sum().backward()
    assert torch.isfinite(policy.grad).all()


# ------------------------------------------------------------------------------- kto_pair
PAIRS = dict(policy_chosen_logps=T([-8.0, -9.0]), ref_chosen_logps=T([-10.0, -10.0]),        # r_w = (2, 1)
             policy_rejected_logps=T([-13.0, -9.0]), ref_rejected_logps=T([-12.0, -12.0]))   # r_l = (-1, 3)


def test_kto_pair_hand_derived():
    # z_w = max(0, mean(2, 1)) = 1.5, z_l = max(0, mean(-1, 3)) = 1
    # pair 1: (1 - sigma(0.1 (2 - 1))) + (1 - sigma(0.1 (1.5 + 1))) = (1 - sigma(0.1)) + (1 - sigma(0.25))
    # pair 2: (1 - sigma(0.1 (1 - 1))) + (1 - sigma(0.1 (1.5 - 3))) = 0.5 + (1 - sigma(-0.15))
    out = losses.compute("kto_pair", **PAIRS, beta=0.1)
    expected = [(1 - sigmoid(0.1)) + (1 - sigmoid(0.25)), 0.5 + (1 - sigmoid(-0.15))]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.losses.tolist() == pytest.approx([0.912844, 1.037430], abs=1e-6)
    assert out.metrics["kto_pair/kl_chosen"].item() == pytest.approx(1.5)
    assert out.metrics["kto_pair/kl_rejected"].item() == pytest.approx(1.0)
    assert out.chosen_rewards.tolist() == pytest.approx([0.2, 0.1])


def test_kto_pair_reference_points_clamped_and_detached():
    # r_w = (-2, -1): z_w = max(0, -1.5) = 0; r_l = (-1, 3): z_l = 1
    # pair 1: (1 - sigma(0.1 (-2 - 1))) + (1 - sigma(0.1 (0 + 1))) = (1 - sigma(-0.3)) + (1 - sigma(0.1))
    pc = T([-12.0, -11.0], requires_grad=True)
    out = losses.compute("kto_pair", **{**PAIRS, "policy_chosen_logps": pc})
    assert out.losses[0].item() == pytest.approx((1 - sigmoid(-0.3)) + (1 - sigmoid(0.1)), abs=1e-6)
    out.losses.sum().backward()
    # detached z_w: d/d pc_i of the loss is only the direct term -0.1 sigma(0.1 (r_w,i - z_l)) (1 - sigma(...))
    direct = [-0.1 * sigmoid(0.1 * (r - 1)) * (1 - sigmoid(0.1 * (r - 1))) for r in (-2.0, -1.0)]
    assert pc.grad.tolist() == pytest.approx(direct, abs=1e-7)


# ------------------------------------------------------------------- through the objective
def test_kto_through_the_objective_uses_mismatched_pairs():
    spec = get_spec("kto")
    ref_model, policy = TinyLM(seed=0), TinyLM(seed=7)  # seeds where z0 > 0 (about 1.08)
    objective = Objective([Term(spec, spec.make_params({}), 1.0, "kto")], FrozenReference(ref_model))
    assert objective.kind == "unpaired" and objective.roles == ("completion", "kl")
    O = Origin("t", 0)
    examples = [EncodedExample([1, 2], {"completion": [3, 4, 5]}, O, label=True),
                EncodedExample([6], {"completion": [7, 8]}, O, label=False),
                EncodedExample([9, 10, 11], {"completion": [12]}, O, label=True)]
    examples = expand_roles(examples, objective.roles)
    batch = PaddedCollator(0, objective.roles)(examples)
    step = objective.forward(policy, batch, objective.units(batch))
    out = step.outputs["kto"]
    with torch.no_grad():
        pol, ref = score_batch(policy, batch), score_batch(ref_model, batch)
    kl_rows = batch.index["kl"]
    z0 = max(0.0, float((pol.logps[kl_rows] - ref.logps[kl_rows]).mean()))
    assert z0 > 0.5 and out.metrics["kl"].item() == pytest.approx(z0, abs=1e-6)
    rows = batch.index["completion"]
    r = (pol.logps[rows] - ref.logps[rows]).tolist()
    expected = [1 - sigmoid(0.1 * (r[0] - z0)), 1 - sigmoid(0.1 * (z0 - r[1])), 1 - sigmoid(0.1 * (r[2] - z0))]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    # the mismatched pair is fixed per example (dataset order), so a one-example micro-batch
    # still has one: example 0 with example 1's completion
    single = PaddedCollator(0, objective.roles)(examples[:1])
    assert single.input_ids[single.index["kl"][0]].tolist()[:4] == [1, 2, 7, 8]
    objective.preflight(single)
