"""Hand-derived values for the reference-free losses: simpo, alphapo, orpo, cpo (sigmoid, hinge, ipo),
tpo, tpo_l, slic.

Every expected value is computed independently with ``math`` next to the arithmetic that
derives it; the loss docstrings carry the same worked examples.
"""
import math

import pytest
import torch

from prefopt import losses
from prefopt.errors import ConfigError
from prefopt.losses import LossInputs, MissingInputError, get_spec

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


def test_cpo_hinge_and_ipo_hand_derived():
    # The pairs of test_cpo_hand_derived: chosen -10 over 5 tokens, rejected -15 over 3; chosen -6 over 2,
    # rejected -4 over 1. beta = 0.1, alpha = 1, NLL = 2 and 3.
    kw = dict(policy_chosen_logps=T([-10.0, -6.0]), policy_rejected_logps=T([-15.0, -4.0]),
              chosen_lengths=T([5, 2]), rejected_lengths=T([3, 1]))
    # hinge on the summed margin m = 5 and -2: max(0, 1 - 0.5) = 0.5, max(0, 1 + 0.2) = 1.2
    hinge = losses.compute("cpo", **kw, loss="hinge")
    assert hinge.losses.tolist() == pytest.approx([max(0.0, 1 - 0.1 * 5) + 2, max(0.0, 1 + 0.1 * 2) + 3], abs=1e-6)
    assert hinge.losses.tolist() == pytest.approx([2.5, 4.2], abs=1e-6)
    # ipo on the length-averaged margin: -10/5 + 15/3 = 3 and -6/2 + 4/1 = 1, target 1/(2 beta) = 5
    ipo = losses.compute("cpo", **kw, loss="ipo")
    assert ipo.losses.tolist() == pytest.approx([(3 - 5) ** 2 + 2, (1 - 5) ** 2 + 3], abs=1e-6)
    assert ipo.losses.tolist() == pytest.approx([6.0, 19.0], abs=1e-6)
    assert ipo.chosen_rewards.tolist() == pytest.approx([0.1 * -2, 0.1 * -3])  # beta * average log-prob, as TRL
    assert ipo.metrics["loss/nll"].tolist() == pytest.approx([2.0, 3.0])
    # hinge is flat past the margin: m = 5 with beta = 0.5 -> 0 (the NLL alone remains)
    assert losses.compute("cpo", **kw, loss="hinge", beta=0.5, alpha=0.0).losses.tolist()[0] == 0.0


def test_cpo_default_is_unchanged_and_the_loss_choice_is_checked():
    spec = get_spec("cpo")
    params = spec.make_params({})
    assert (params.beta, params.alpha, params.label_smoothing, params.loss) == (0.1, 1.0, 0.0, "sigmoid")
    assert spec.extra_inputs(params) == ("chosen_lengths",)
    assert spec.extra_inputs(spec.make_params({"loss": "ipo"})) == ("chosen_lengths", "rejected_lengths")
    kw = dict(policy_chosen_logps=T([-10.0]), policy_rejected_logps=T([-15.0]), chosen_lengths=T([5]))
    assert losses.compute("cpo", **kw, loss="sigmoid").losses.item() == pytest.approx(softplus_neg(0.5) + 2, abs=1e-6)
    with pytest.raises(ConfigError, match="label_smoothing=0.1 applies to loss: sigmoid only"):
        losses.compute("cpo", **kw, loss="hinge", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="not one of"):
        losses.compute("cpo", **kw, loss="simpo")


# --------------------------------------------------------------------------------- alphapo
def test_alphapo_hand_derived():
    # beta = 1, gamma = 0.5, alpha = 0.5; r(y) = beta (1 - e^(-alpha a)) / alpha, a = average log-prob.
    # Pair 1: a_w = -4/4 = -1, a_l = -6/3 = -2: r_w = 2 (1 - e^0.5) = -1.297443, r_l = 2 (1 - e^1) = -3.436564,
    #   z = r_w - r_l - 0.5 = 1.639121, L = log(1 + e^-z) = 0.177435
    # Pair 2: a_w = -3/1, a_l = -2/2 = -1: r_w = 2 (1 - e^1.5) = -6.963378, r_l = -1.297443,
    #   z = -6.165936, L = 6.168033
    kw = dict(policy_chosen_logps=T([-4.0, -3.0]), policy_rejected_logps=T([-6.0, -2.0]),
              chosen_lengths=T([4, 1]), rejected_lengths=T([3, 2]))
    out = losses.compute("alphapo", **kw, beta=1.0, gamma=0.5, alpha=0.5)
    r = lambda a: (1 - math.exp(-0.5 * a)) / 0.5  # noqa: E731
    z = [r(-1) - r(-2) - 0.5, r(-3) - r(-1) - 0.5]
    assert out.losses.tolist() == pytest.approx([softplus_neg(z[0]), softplus_neg(z[1])], abs=1e-6)
    assert out.losses.tolist() == pytest.approx([0.177435, 6.168033], abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([-1.297443, -6.963378], abs=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx([-3.436564, -1.297443], abs=1e-6)


def test_alphapo_tends_to_simpo_as_alpha_goes_to_zero():
    kw = dict(policy_chosen_logps=T([-10.0, -8.0, -40.0]), policy_rejected_logps=T([-15.0, -3.0, -20.0]),
              chosen_lengths=T([5, 4, 8]), rejected_lengths=T([3, 1, 2]))
    simpo = losses.compute("simpo", **kw, beta=2.0, gamma=1.0).losses
    exact = losses.compute("alphapo", **kw, beta=2.0, gamma=1.0, alpha=0.0).losses
    assert torch.equal(exact, simpo)  # alpha = 0 is SimPO's log reward
    gaps = [(losses.compute("alphapo", **kw, beta=2.0, gamma=1.0, alpha=a).losses - simpo).abs().max().item()
            for a in (1e-2, 1e-3, 1e-4)]
    # (1 - e^(-a x))/a = x - a x^2/2 + ...: the gap shrinks tenfold with a
    assert gaps[1] < 0.2 * gaps[0] and gaps[2] < 0.2 * gaps[1] and gaps[2] < 1e-3
    # the label smoothing is SimPO's too
    assert torch.allclose(losses.compute("alphapo", **kw, alpha=0.0, label_smoothing=0.1).losses,
                          losses.compute("simpo", **kw, label_smoothing=0.1).losses)
    spec = get_spec("alphapo")
    assert not spec.needs_reference(spec.make_params({})) and spec.make_params({}).alpha == 0.25


def test_alphapo_bounds_the_reward_and_stays_finite():
    # alpha > 0: r = beta (1 - e^(-alpha a))/alpha <= beta/alpha (a <= 0), and an average log-prob of -1e4
    # (exponent capped) stays finite with a finite gradient
    pc = T([-1e-4, -1e4], requires_grad=True)
    out = losses.compute("alphapo", policy_chosen_logps=pc, policy_rejected_logps=T([-1e4, -1e-4]),
                         chosen_lengths=T([1, 1]), rejected_lengths=T([1, 1]), beta=2.0, alpha=0.5)
    assert (out.chosen_rewards <= 2.0 / 0.5).all() and torch.isfinite(out.losses).all()
    out.losses.sum().backward()
    assert torch.isfinite(pc.grad).all()


# ------------------------------------------------------------------------------ tpo, tpo_l
TRIPLE = dict(policy_chosen_logps=T([-10.0]), policy_rejected_logps=T([-15.0]), chosen_lengths=T([5]),
              rejected_lengths=T([3]), policy_ref_completion_logps=T([-12.0]), ref_completion_lengths=T([4]))


def test_tpo_hand_derived():
    # beta = 0.1, alpha = 1: m = -10 + 15 = 5, log(1 + e^-0.5) = 0.474077; gold NLL = 12/4 = 3. L = 3.474077
    out = losses.compute("tpo", **TRIPLE, beta=0.1, alpha=1.0)
    assert out.losses.item() == pytest.approx(softplus_neg(0.5) + 12 / 4, abs=1e-6)
    assert out.losses.item() == pytest.approx(3.474077, abs=1e-6)
    assert out.metrics["loss/nll"].tolist() == pytest.approx([3.0])
    assert out.chosen_rewards.tolist() == pytest.approx([-1.0])  # beta * summed log-prob, as TRL
    # hinge: max(0, 1 - 0.5) + 3 = 3.5; ipo: averaged margin -10/5 + 15/3 = 3, (3 - 5)^2 + 3 = 7
    assert losses.compute("tpo", **TRIPLE, beta=0.1, loss="hinge").losses.item() == pytest.approx(3.5)
    assert losses.compute("tpo", **TRIPLE, beta=0.1, loss="ipo").losses.item() == pytest.approx(7.0)
    assert get_spec("tpo").make_params({}).beta == 0.01  # TRL's TPOConfig default


def test_tpo_with_the_chosen_as_gold_is_cpo():
    kw = dict(TRIPLE, policy_ref_completion_logps=T([-10.0]), ref_completion_lengths=T([5]))
    for loss in ("sigmoid", "hinge", "ipo"):
        assert torch.allclose(losses.compute("tpo", **kw, beta=0.1, loss=loss).losses,
                              losses.compute("cpo", **kw, beta=0.1, loss=loss).losses)


def test_tpo_requires_the_gold_response():
    spec = get_spec("tpo")
    params = spec.make_params({})
    assert spec.needed_columns(params) == ("ref_completion",)
    assert {"policy_ref_completion_logps", "ref_completion_lengths"} <= spec.needed_inputs(params, paired=True)
    gold_free = {k: v for k, v in TRIPLE.items() if not k.startswith(("policy_ref", "ref_"))}
    # no stand-in: the chosen is not taken as the gold (SLiC's fallback does not apply to a required column)
    with pytest.raises(MissingInputError, match=r"ref_completion_lengths \(the data must have the column\(s\) ref_completion\)"):
        losses.compute("tpo", **gold_free)
    with pytest.raises(MissingInputError, match="ref_completion"):
        losses.compute("tpo_l", **gold_free)


def test_tpo_l_hand_derived():
    # beta = 2, gamma = 1, alpha = 1: z = 2(-10/5) - 2(-15/3) - 1 = 5, log(1 + e^-5) = 0.006715; NLL = 3
    out = losses.compute("tpo_l", **TRIPLE, beta=2.0, gamma=1.0, alpha=1.0)
    assert out.losses.item() == pytest.approx(softplus_neg(5.0) + 3.0, abs=1e-6)
    assert out.losses.item() == pytest.approx(3.006715, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([-4.0]) and out.rejected_rewards.tolist() == pytest.approx([-10.0])
    # without the gold NLL, TPO-L is SimPO
    assert torch.allclose(losses.compute("tpo_l", **TRIPLE, alpha=0.0, beta=2.0, gamma=0.5).losses,
                          losses.compute("simpo", **TRIPLE, beta=2.0, gamma=0.5).losses)


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


def test_tpo_reads_the_gold_column_and_rejects_pairs_without_it(tiny_model_dir, tmp_path):
    """End to end: the gold (ref_completion, or TRL's `reference` via data.columns) is scored as a third
    completion; a record without it is a bad record at its file and line, never trained on the chosen."""
    import json

    from prefopt import DPOConfig, DPOTrainer
    from prefopt.errors import DataError

    rows = [{"prompt": f"Q{i}", "chosen": " a b", "rejected": " c", "reference": " a b c d"} for i in range(4)]
    path = tmp_path / "triples.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = dict(max_length=64, max_prompt_length=32, logging_steps=1, progress_bar=False, max_steps=1,
                per_device_train_batch_size=2, loss={"name": "tpo", "beta": 0.1})
    t = DPOTrainer(str(tiny_model_dir), None, train_dataset=str(path),
                   args=DPOConfig(output_dir=str(tmp_path / "o"), columns={"ref_completion": "reference"}, **args))
    t.train()
    assert t.job.objective.roles == ("chosen", "rejected", "ref_completion")
    row = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])
    # the gold " a b c d" is longer than the chosen " a b": its per-token NLL is not the chosen's
    assert row["loss/nll"] > 0 and math.isfinite(row["loss"])
    bad = tmp_path / "pairs.jsonl"
    bad.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "reference"}) for r in rows) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:1: .*missing column 'ref_completion', which the loss needs"):
        DPOTrainer(str(tiny_model_dir), None, train_dataset=str(bad),
                   args=DPOConfig(output_dir=str(tmp_path / "b"), **args)).train()
