"""Hand-derived values for TDPO1 and TDPO2, their reduction to DPO, and TDPO2's stop-gradient."""
import math

import pytest
import torch

from prefopt import losses
from prefopt.data.collate import PaddedCollator
from prefopt.data.schema import Origin
from prefopt.data.tokenize import EncodedExample
from prefopt.losses import MissingInputError, get_spec
from prefopt.objective import Objective, Term

from helpers import FrozenReference, TinyLM

T = torch.tensor


def softplus_neg(z):  # −log σ(z)
    return math.log1p(math.exp(-z))


# r_w = (2, -1), r_l = (-1, 1): h = (3, -2)
PAIRS = dict(policy_chosen_logps=T([-10.0, -9.0]), ref_chosen_logps=T([-12.0, -8.0]),
             policy_rejected_logps=T([-15.0, -4.0]), ref_rejected_logps=T([-14.0, -5.0]),
             chosen_lengths=T([5, 3]), rejected_lengths=T([4, 2]))
SEQ_KL = dict(chosen_seq_kl=T([1.0, 2.0]), rejected_seq_kl=T([4.0, 0.0]))


def test_tdpo1_hand_derived():
    # beta = 0.1. Pair 1: z = 0.1 (3 - (4 - 1)) = 0 -> log 2.  Pair 2: z = 0.1 (-2 - (0 - 2)) = 0 -> log 2.
    out = losses.compute("tdpo1", **PAIRS, **SEQ_KL, beta=0.1)
    assert out.losses.tolist() == pytest.approx([math.log(2), math.log(2)], abs=1e-6)
    # beta = 0.5. Pair 1: D_w = 0, D_l = 1 -> z = 0.5 (3 - (1 - 0)) = 1 -> log(1 + e^-1)
    # Pair 2: D_w = 3, D_l = 0 -> z = 0.5 (-2 - (0 - 3)) = 0.5 -> log(1 + e^-0.5)
    out = losses.compute("tdpo1", **PAIRS, chosen_seq_kl=T([0.0, 3.0]), rejected_seq_kl=T([1.0, 0.0]), beta=0.5)
    assert out.losses.tolist() == pytest.approx([softplus_neg(1.0), softplus_neg(0.5)], abs=1e-6)
    assert out.metrics["tdpo/seq_kl_chosen"].tolist() == [0.0, 3.0]
    assert out.metrics["tdpo/seq_kl_rejected"].tolist() == [1.0, 0.0]
    assert out.chosen_rewards.tolist() == pytest.approx([1.0, -0.5])  # beta * r_w, as DPO


def test_tdpo2_hand_derived():
    # beta = 0.1, alpha = 0.5. Pair 1: z = 0.1 (3 - 0.5 (4 - 1)) = 0.15 -> log(1 + e^-0.15) = 0.620957
    # Pair 2: z = 0.1 (-2 - 0.5 (0 - 2)) = -0.1 -> log(1 + e^0.1) = 0.744397
    out = losses.compute("tdpo2", **PAIRS, **SEQ_KL)
    assert out.losses.tolist() == pytest.approx([softplus_neg(0.15), softplus_neg(-0.1)], abs=1e-6)
    assert out.losses.tolist() == pytest.approx([0.620957, 0.744397], abs=1e-6)
    # alpha = 1 makes TDPO2's value equal TDPO1's (only the gradient differs)
    assert torch.allclose(losses.compute("tdpo2", **PAIRS, **SEQ_KL, alpha=1.0).losses,
                          losses.compute("tdpo1", **PAIRS, **SEQ_KL).losses)


@pytest.mark.parametrize("name", ["tdpo1", "tdpo2"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_equals_dpo_when_policy_is_the_reference(name, beta):
    zero = dict(chosen_seq_kl=T([0.0, 0.0]), rejected_seq_kl=T([0.0, 0.0]))
    out = losses.compute(name, **PAIRS, **zero, beta=beta)
    dpo = losses.compute("dpo", **PAIRS, beta=beta)
    assert torch.allclose(out.losses, dpo.losses, rtol=0, atol=1e-7)
    assert torch.allclose(out.chosen_rewards, dpo.chosen_rewards) and torch.allclose(out.rejected_rewards,
                                                                                   dpo.rejected_rewards)


def test_tdpo2_stops_the_gradient_of_the_chosen_seq_kl_and_tdpo1_does_not():
    grads = {}
    for name in ("tdpo1", "tdpo2"):
        kl_w = SEQ_KL["chosen_seq_kl"].clone().requires_grad_(True)
        kl_l = SEQ_KL["rejected_seq_kl"].clone().requires_grad_(True)
        losses.compute(name, **PAIRS, chosen_seq_kl=kl_w, rejected_seq_kl=kl_l).losses.sum().backward()
        grads[name] = kl_w.grad, kl_l.grad
    w2, l2 = grads["tdpo2"]
    assert w2 is None or not w2.any()
    # d/dD_l of -log sigma(z), z = ... - 0.5 * 0.1 * D_l: 0.05 sigma(-z) at z = 0.15, -0.1
    assert l2.tolist() == pytest.approx([0.05 / (1 + math.exp(0.15)), 0.05 / (1 + math.exp(-0.1))], abs=1e-7)
    w1, l1 = grads["tdpo1"]
    # tdpo1: z = 0.1 (h - D_l + D_w) = 0 for both pairs: dL/dD_w = -0.1 sigma(0) = -0.05, dL/dD_l = +0.05
    assert w1.tolist() == pytest.approx([-0.05, -0.05], abs=1e-7)
    assert l1.tolist() == pytest.approx([0.05, 0.05], abs=1e-7)


@pytest.mark.parametrize("name", ["tdpo1", "tdpo2"])
def test_needs_token_level_statistics(name):
    spec = get_spec(name)
    assert spec.needs_token_stats(spec.params()) and spec.needs_reference(spec.params())
    with pytest.raises(MissingInputError, match="chosen_seq_kl.*token-level"):
        losses.compute(name, **PAIRS)


@pytest.mark.parametrize("name", ["tdpo1", "tdpo2"])
def test_every_field_set_and_extremes(name):
    big, tiny = -1e4, -1e-4
    pc, pr = T([tiny, big, big], requires_grad=True), T([big, tiny, big], requires_grad=True)
    kl_w, kl_l = T([0.0, 1e4, 5.0], requires_grad=True), T([1e4, 0.0, 5.0], requires_grad=True)
    out = losses.compute(
        name, policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=T([big, tiny, tiny]),
        ref_rejected_logps=T([tiny, big, big]), chosen_lengths=T([1, 2000, 1]), rejected_lengths=T([2000, 1, 1]),
        chosen_seq_kl=kl_w, rejected_seq_kl=kl_l, policy_logps=T([-1.0] * 3), ref_logps=T([-1.0] * 3),
        lengths=T([1] * 3), labels=T([True, False, True]), policy_kl_logps=T([-1.0] * 3),
        ref_kl_logps=T([-1.0] * 3), policy_ref_completion_logps=T([-2.0] * 3), ref_completion_lengths=T([2] * 3),
        extras={"preference_prob": T([1.0] * 3)})
    assert torch.isfinite(out.losses).all()
    out.losses.sum().backward()
    for t in (pc, pr, kl_w, kl_l):
        assert t.grad is None or torch.isfinite(t.grad).all()


def test_tdpo_through_the_objective_gets_seq_kl():
    O = Origin("t", 0)
    examples = [EncodedExample([1, 2], {"chosen": [3, 4, 5], "rejected": [6, 7]}, O),
                EncodedExample([8], {"chosen": [9], "rejected": [10, 11, 12]}, O)]
    batch = PaddedCollator(0, ("chosen", "rejected"))(examples)
    ref_model = TinyLM(seed=0)
    for name in ("tdpo1", "tdpo2"):
        spec = get_spec(name)
        objective = Objective([Term(spec, spec.make_params({}), 1.0, name)], FrozenReference(ref_model))
        assert objective.token_level
        # policy == reference: SeqKL = 0, every loss is log 2 (DPO at h = 0)
        same = objective.forward(ref_model, batch, objective.units(batch)).outputs[name]
        assert torch.allclose(same.metrics["tdpo/seq_kl_chosen"], torch.zeros(2), atol=1e-5)
        assert torch.allclose(same.losses, torch.full((2,), math.log(2)), atol=1e-5)
        # another policy: SeqKL > 0 and the loss has a gradient
        policy = TinyLM(seed=3)
        step = objective.forward(policy, batch, objective.units(batch))
        assert (step.outputs[name].metrics["tdpo/seq_kl_rejected"] > 0).all()
        step.loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in policy.parameters())
