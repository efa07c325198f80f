"""Hand-derived values for the reference-free losses: simpo, orpo, cpo, slic.

Every expected value is computed independently with ``math`` next to the arithmetic that
derives it; the loss docstrings carry the same worked examples.
"""
import math

import pytest
import torch

from prefopt import losses
from prefopt.losses import LossInputs, get_spec

T = torch.tensor


def softplus_neg(z):  # −log σ(z) = log(1 + e^−z)
    return math.log1p(math.exp(-z))


def full_inputs(**over) -> dict:
    """Every LossInputs field set (paired and unpaired), so losses must ignore what they do not use."""
    kw = dict(policy_chosen_logps=T([-10.0, -8.0]), policy_rejected_logps=T([-15.0, -3.0]),
              ref_chosen_logps=T([-12.0, -9.0]), ref_rejected_logps=T([-14.0, -4.0]),
              chosen_lengths=T([5, 4]), rejected_lengths=T([3, 1]),
              policy_logps=T([-1.0, -2.0]), ref_logps=T([-1.5, -2.5]), lengths=T([2, 3]),
              labels=T([True, False]), policy_kl_logps=T([-3.0, -4.0]), ref_kl_logps=T([-3.5, -4.5]),
              chosen_seq_kl=T([0.1, 0.2]), rejected_seq_kl=T([0.3, 0.4]),
              policy_ref_completion_logps=T([-11.0, -7.0]), ref_completion_lengths=T([6, 2]),
              extras={"preference_prob": T([0.9, 0.8]), "margin": T([0.5, 1.0])})
    kw.update(over)
    return kw


# ------------------------------------------------------------------------------------ simpo
def test_simpo_hand_derived():
    # beta = 2, gamma = 1. Pair 1: averages -10/5 = -2 and -15/3 = -5: z = 2(-2) - 2(-5) - 1 = 5.
    # Pair 2: averages -8/4 = -2 and -3/1 = -3: z = -4 + 6 - 1 = 1.  L = log(1 + e^-z).
    out = losses.compute("simpo", policy_chosen_logps=T([-10.0, -8.0]), policy_rejected_logps=T([-15.0, -3.0]),
                         chosen_lengths=T([5, 4]), rejected_lengths=T([3, 1]), beta=2.0, gamma=1.0)
    assert out.losses.tolist() == pytest.approx([softplus_neg(5.0), softplus_neg(1.0)], abs=1e-6)
    assert out.losses.tolist() == pytest.approx([0.006715, 0.313262], abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([-4.0, -4.0])     # beta * average log-prob
    assert out.rejected_rewards.tolist() == pytest.approx([-10.0, -6.0])


def test_simpo_defaults_and_label_smoothing():
    spec = get_spec("simpo")
    assert spec.params().beta == 2.0 and spec.params().gamma == 1.0  # gamma/beta = 0.5 (SimPO README)
    assert not spec.needs_reference(spec.params())
    # eps = 0.1 on pair 1 (z = 5): 0.9 log(1 + e^-5) + 0.1 log(1 + e^5)
    out = losses.compute("simpo", policy_chosen_logps=T([-10.0]), policy_rejected_logps=T([-15.0]),
                         chosen_lengths=T([5]), rejected_lengths=T([3]), label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.9 * softplus_neg(5.0) + 0.1 * softplus_neg(-5.0), abs=1e-6)


# ------------------------------------------------------------------------------------- orpo
def test_orpo_hand_derived():
    # Pair 1: chosen average log-prob log 0.5 (2 tokens), odds 1; rejected log 0.25 (3 tokens), odds 1/3.
    #   log odds ratio = 0 - log(1/3) = log 3; L_OR = -log sigma(log 3) = -log(3/4); NLL = log 2.
    #   L = log 2 + 0.1 * log(4/3) = 0.721915
    # Pair 2: chosen log 0.8 (4 tokens), odds 4; rejected log 0.5 (1 token), odds 1.
    #   L_OR = -log(4/5); NLL = -log 0.8.  L = -log 0.8 + 0.1 * log(5/4) = 0.245458
    pc = T([2 * math.log(0.5), 4 * math.log(0.8)])
    pr = T([3 * math.log(0.25), math.log(0.5)])
    out = losses.compute("orpo", policy_chosen_logps=pc, policy_rejected_logps=pr,
                         chosen_lengths=T([2, 4]), rejected_lengths=T([3, 1]), beta=0.1)
    expected = [math.log(2) + 0.1 * math.log(4 / 3), -math.log(0.8) + 0.1 * math.log(5 / 4)]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.losses.tolist() == pytest.approx([0.721915, 0.245458], abs=1e-6)
    assert out.metrics["orpo/log_odds_ratio"].tolist() == pytest.approx([math.log(3), math.log(4)], abs=1e-6)
    assert out.metrics["loss/nll"].tolist() == pytest.approx([math.log(2), -math.log(0.8)], abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1 * math.log(0.5), 0.1 * math.log(0.8)], abs=1e-6)


def test_orpo_log_one_minus_p_is_stable_near_p_one_and_p_zero():
    from prefopt.losses.reference_free import log1m_exp

    # p -> 1: log(1 - e^-1e-4) = log(1e-4 - 5e-9 ...) ~ log(9.9995e-5)
    assert log1m_exp(T([-1e-4])).item() == pytest.approx(math.log(-math.expm1(-1e-4)), rel=1e-5)
    # p -> 0: log(1 - e^-1e4) = 0
    assert log1m_exp(T([-1e4])).item() == 0.0
    # p = 1 exactly (or rounded above): clamped, finite
    assert torch.isfinite(log1m_exp(T([0.0, 1e-3]))).all()
    # average log-probs of -1e-4 and -1e4 in the loss itself, with gradients
    pc = T([-1e-4, -1e4, -1e-4 * 2000], requires_grad=True)
    pr = T([-1e4, -1e-4, -1e4], requires_grad=True)
    out = losses.compute("orpo", policy_chosen_logps=pc, policy_rejected_logps=pr,
                         chosen_lengths=T([1, 1, 2000]), rejected_lengths=T([1, 1, 1]))
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


# -------------------------------------------------------------------------------------- cpo
def test_cpo_hand_derived():
    # beta = 0.1, alpha = 1. Pair 1: z = 0.1 (-10 + 15) = 0.5, NLL = 10/5 = 2.  L = log(1 + e^-0.5) + 2
    # Pair 2: z = 0.1 (-6 + 4) = -0.2, NLL = 6/2 = 3.  L = log(1 + e^0.2) + 3
    kw = dict(policy_chosen_logps=T([-10.0, -6.0]), policy_rejected_logps=T([-15.0, -4.0]), chosen_lengths=T([5, 2]))
    out = losses.compute("cpo", **kw)
    assert out.losses.tolist() == pytest.approx([softplus_neg(0.5) + 2, softplus_neg(-0.2) + 3], abs=1e-6)
    assert out.losses.tolist() == pytest.approx([2.474077, 3.798139], abs=1e-6)
    assert out.metrics["loss/nll"].tolist() == pytest.approx([2.0, 3.0])
    assert out.chosen_rewards.tolist() == pytest.approx([-1.0, -0.6])  # beta * summed log-prob
    # alpha = 0.5, eps = 0.2: 0.8 log(1 + e^-z) + 0.2 log(1 + e^z) + 0.5 NLL
    out = losses.compute("cpo", **kw, alpha=0.5, label_smoothing=0.2)
    expected = [0.8 * softplus_neg(z) + 0.2 * softplus_neg(-z) + 0.5 * n for z, n in [(0.5, 2.0), (-0.2, 3.0)]]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------- slic
SLIC_PAIR = dict(policy_chosen_logps=T([-10.0, -6.0]), policy_rejected_logps=T([-15.0, -5.5]),
                 chosen_lengths=T([5, 3]), rejected_lengths=T([3, 2]))


def test_slic_hand_derived_with_ref_completion():
    # delta = 1, lambda = 0.5. Pair 1: hinge max(0, 1 - (-10) + (-15)) = max(0, -4) = 0; reg 0.5 * 12 = 6.
    # Pair 2: hinge max(0, 1 + 6 - 5.5) = 1.5; reg 0.5 * 4 = 2.  L = (6, 3.5)
    out = losses.compute("slic", **SLIC_PAIR, policy_ref_completion_logps=T([-12.0, -4.0]),
                         ref_completion_lengths=T([4, 2]), delta=1.0, reg_weight=0.5)
    assert out.losses.tolist() == pytest.approx([0.0 + 0.5 * 12, 1.5 + 0.5 * 4])
    assert out.losses.tolist() == pytest.approx([6.0, 3.5])
    assert out.metrics["slic/reg"].tolist() == pytest.approx([12.0, 4.0])      # -log p(y_ref), summed
    assert out.metrics["loss/nll"].tolist() == pytest.approx([3.0, 2.0])       # per token: 12/4, 4/2
    assert out.chosen_rewards.tolist() == [-10.0, -6.0]


def test_slic_without_ref_completion_regularises_the_chosen():
    # y_ref = chosen: pair 1: 0 + 0.5 * 10 = 5; pair 2: 1.5 + 0.5 * 6 = 4.5
    spec = get_spec("slic")
    params = spec.make_params({})
    assert (params.delta, params.reg_weight) == (1.0, 0.5)
    out = spec.fn(LossInputs(**SLIC_PAIR), params)
    assert out.losses.tolist() == pytest.approx([5.0, 4.5])
    assert out.metrics["loss/nll"].tolist() == pytest.approx([2.0, 2.0])  # 10/5, 6/3
    # the objective passes the chosen's log-prob as y_ref when the column is absent: same result
    explicit = losses.compute("slic", **SLIC_PAIR, policy_ref_completion_logps=SLIC_PAIR["policy_chosen_logps"])
    assert torch.equal(explicit.losses, out.losses)
    # the role is requested from the objective, so a ref_completion column is picked up
    assert "policy_ref_completion_logps" in spec.extra_inputs(params) and not spec.needs_reference(params)


# ---------------------------------------------------------------------------- all four losses
NAMES = ["simpo", "orpo", "cpo", "slic"]


@pytest.mark.parametrize("name", NAMES)
def test_accepts_inputs_with_every_field_set(name):
    out = losses.compute(name, **full_inputs())
    assert out.losses.shape == (2,) and torch.isfinite(out.losses).all()
    assert not get_spec(name).needs_reference(get_spec(name).params())


@pytest.mark.parametrize("name", NAMES)
def test_finite_with_finite_gradients_at_extreme_log_probs(name):
    big, tiny = -1e4, -1e-4
    pc = T([tiny, big, big, tiny, -5.0], requires_grad=True)
    pr = T([big, tiny, big, tiny, -5.0], requires_grad=True)
    ref = T([tiny, big, tiny, big, -3.0], requires_grad=True)
    kw = full_inputs(policy_chosen_logps=pc, policy_rejected_logps=pr, policy_ref_completion_logps=ref,
                     chosen_lengths=T([1, 2000, 1, 2000, 7]), rejected_lengths=T([2000, 1, 1, 2000, 3]),
                     ref_completion_lengths=T([1, 2000, 5, 1, 2]),
                     ref_chosen_logps=None, ref_rejected_logps=None)
    for key in ("policy_logps", "ref_logps", "lengths", "labels", "policy_kl_logps", "ref_kl_logps",
                "chosen_seq_kl", "rejected_seq_kl"):
        kw.pop(key)
    out = losses.compute(name, **kw)
    assert torch.isfinite(out.losses).all(), out.losses
    out.losses.sum().backward()
    for t in (pc, pr, ref):
        assert t.grad is None or torch.isfinite(t.grad).all()
    for value in out.metrics.values():
        assert torch.isfinite(value).all()


def test_slic_through_the_objective_reads_the_ref_completion_role():
    from types import SimpleNamespace

    from prefopt.data.collate import PaddedCollator
    from prefopt.data.roles import expand_roles
    from prefopt.data.schema import Origin
    from prefopt.data.tokenize import EncodedExample
    from prefopt.logps import score_batch
    from prefopt.objective import Objective, Term

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.head = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16)

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
            return SimpleNamespace(logits=self.head(self.emb(input_ids)))

    spec = get_spec("slic")
    objective = Objective([Term(spec, spec.make_params({}), 1.0, "slic")], reference=None)
    assert objective.roles == ("chosen", "rejected", "ref_completion") and not objective.needs_reference
    O = Origin("t", 0)
    examples = [EncodedExample([1], {"chosen": [2, 3], "rejected": [4], "ref_completion": [5, 6, 7]}, O),
                EncodedExample([8], {"chosen": [9], "rejected": [10, 11]}, O)]  # no column: the chosen
    batch = PaddedCollator(0, objective.roles)(expand_roles(examples, objective.roles))
    model = TinyLM()
    out = objective.forward(model, batch, objective.units(batch)).outputs["slic"]
    with torch.no_grad():
        logps = score_batch(model, batch).logps
    ci, ri = batch.index["chosen"], batch.index["rejected"]
    y_ref = [logps[batch.index["ref_completion"][0]], logps[ci[1]]]  # example 2 falls back to its chosen
    expected = [max(0.0, 1 - float(logps[ci[i]] - logps[ri[i]])) - 0.5 * float(y_ref[i]) for i in range(2)]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-5)
    assert out.metrics["loss/nll"].tolist() == pytest.approx([-float(y_ref[0]) / 3, -float(y_ref[1]) / 1], abs=1e-5)
