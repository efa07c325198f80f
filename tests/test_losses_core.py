"""Hand-derived values for the foundation losses (dpo, cDPO, reference-free, ipo, sft)."""
import math

import pytest
import torch

from prefopt import losses
from prefopt.errors import ConfigError
from prefopt.losses import MissingInputError

T = torch.tensor


def pair(pc=-10.0, pr=-15.0, rc=-12.0, rr=-14.0, lc=5, lr=3):
    return dict(policy_chosen_logps=T([pc]), policy_rejected_logps=T([pr]), ref_chosen_logps=T([rc]),
                ref_rejected_logps=T([rr]), chosen_lengths=T([lc]), rejected_lengths=T([lr]))


def test_dpo_hand_derived():
    # r_w = 2, r_l = -1, h = 3, beta h = 0.3: -log sigmoid(0.3) = log(1 + e^-0.3)
    out = losses.compute("dpo", **pair(), beta=0.1)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.3)), abs=1e-6)
    assert out.losses.item() == pytest.approx(0.554355, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.2)
    assert out.rejected_rewards.item() == pytest.approx(-0.1)


def test_cdpo_hand_derived():
    # 0.9 * log(1 + e^-0.3) + 0.1 * log(1 + e^0.3)
    out = losses.compute("dpo", **pair(), beta=0.1, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.9 * 0.5543552 + 0.1 * 0.8543552, abs=1e-6)
    assert out.losses.item() == pytest.approx(0.584355, abs=1e-6)


def test_dpo_reference_free_uses_policy_logps_only():
    # h = -10 - (-15) = 5, beta h = 0.5
    out = losses.compute("dpo", policy_chosen_logps=T([-10.0]), policy_rejected_logps=T([-15.0]),
                         beta=0.1, reference_free=True)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.5)), abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(-1.0)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_dpo_is_ln2_when_policy_equals_reference(beta, eps):
    logps = T([-3.0, -50.0, -700.0])
    out = losses.compute("dpo", policy_chosen_logps=logps, policy_rejected_logps=logps - 7,
                         ref_chosen_logps=logps, ref_rejected_logps=logps - 7, beta=beta, label_smoothing=eps)
    assert torch.allclose(out.losses, torch.full((3,), math.log(2)))


def test_ipo_hand_derived_uses_length_averaged_logps():
    # tau = 0.5 -> target 1; r_w = 2/5 = 0.4, r_l = -1/3; h = 0.733333; (h - 1)^2 = 0.0711111
    out = losses.compute("ipo", **pair(), beta=0.5)
    assert out.losses.item() == pytest.approx((0.4 + 1 / 3 - 1.0) ** 2, abs=1e-6)
    assert out.losses.item() == pytest.approx(0.0711111, abs=1e-6)


def test_ipo_needs_lengths():
    kw = pair()
    kw.pop("chosen_lengths")
    with pytest.raises(MissingInputError, match="chosen_lengths"):
        losses.compute("ipo", **kw)


def test_sft_paired_and_unpaired():
    out = losses.compute("sft", policy_chosen_logps=T([-6.0, -2.0]), chosen_lengths=T([3, 1]),
                         policy_rejected_logps=T([-1.0, -1.0]))
    assert out.losses.tolist() == [6.0, 2.0]  # the loop divides the step's sum by 4 tokens: 2.0
    out = losses.compute("sft", policy_logps=T([-6.0, -2.0]), lengths=T([3, 1]), labels=T([True, False]))
    assert out.losses.tolist() == [6.0, 0.0]  # undesirable completions are not imitated


def test_compute_rejects_unknown_parameter_with_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'beta'"):
        losses.compute("dpo", **pair(), bta=0.1)


def test_parameter_ranges_are_checked():
    with pytest.raises(ConfigError, match="label_smoothing=0.5 must be < 0.5"):
        losses.compute("dpo", **pair(), label_smoothing=0.5)
    with pytest.raises(ConfigError, match="beta=0.0 must be > 0"):
        losses.compute("dpo", **pair(), beta=0.0)


def test_unknown_loss_suggests_closest():
    with pytest.raises(KeyError, match="did you mean 'ipo'"):
        losses.get_spec("ipoo")


def test_missing_reference_is_named():
    with pytest.raises(MissingInputError, match="ref_chosen_logps.*reference"):
        losses.compute("dpo", policy_chosen_logps=T([-1.0]), policy_rejected_logps=T([-2.0]))


def test_alias_resolves_to_canonical_spec():
    assert losses.get_spec("sigmoid") is losses.get_spec("dpo")


def test_f_divergences_hand_derived():
    kw = pair()
    # JS: h = (2 - log(1+e^2)) - (-1 - log(1+e^-1)) = 1.186334; L = log(1 + e^-0.1186334)
    js = (2 - math.log(1 + math.e ** 2)) - (-1 - math.log(1 + math.e ** -1))
    assert js == pytest.approx(1.186334, abs=1e-6)
    out = losses.compute("dpo", **kw, beta=0.1, f_divergence="js")
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.1 * js)), abs=1e-6)
    assert out.losses.item() == pytest.approx(0.635589, abs=1e-6)
    # alpha = 0.5: h = ((1 - e^-1) - (1 - e^0.5)) / 0.5 = 2.561684
    al = ((1 - math.exp(-1)) - (1 - math.exp(0.5))) / 0.5
    out = losses.compute("dpo", **kw, beta=0.1, f_divergence="alpha", f_alpha=0.5)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.1 * al)), abs=1e-6)
    assert out.losses.item() == pytest.approx(0.573243, abs=1e-6)
    # forward KL is the alpha-divergence at alpha = 1: h = (1 - e^-2) - (1 - e^1) = e - e^-2
    fwd = losses.compute("dpo", **kw, beta=0.1, f_divergence="forward_kl").losses
    assert fwd.item() == pytest.approx(math.log(1 + math.exp(-0.1 * (math.e - math.exp(-2)))), abs=1e-6)
    assert torch.allclose(fwd, losses.compute("dpo", **kw, f_divergence="alpha", f_alpha=1.0).losses)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js", "alpha"])
def test_every_f_divergence_is_ln2_at_the_reference(divergence):
    logps = T([-3.0, -300.0])
    out = losses.compute("dpo", policy_chosen_logps=logps, policy_rejected_logps=logps - 1, ref_chosen_logps=logps,
                         ref_rejected_logps=logps - 1, f_divergence=divergence)
    assert torch.allclose(out.losses, torch.full((2,), math.log(2)))


def test_soft_dpo_hand_derived_and_reductions():
    # p = 0.8: 0.8 * log(1 + e^-0.3) + 0.2 * log(1 + e^0.3) = 0.614355
    out = losses.compute("soft_dpo", **pair(), beta=0.1, preference_prob=T([0.8]))
    assert out.losses.item() == pytest.approx(0.8 * math.log(1 + math.exp(-0.3)) + 0.2 * math.log(1 + math.exp(0.3)), abs=1e-6)
    assert out.losses.item() == pytest.approx(0.614355, abs=1e-6)
    one = losses.compute("soft_dpo", **pair(), preference_prob=T([1.0])).losses
    assert torch.allclose(one, losses.compute("dpo", **pair()).losses)
    cdpo = losses.compute("soft_dpo", **pair(), preference_prob=T([0.9])).losses
    assert torch.allclose(cdpo, losses.compute("dpo", **pair(), label_smoothing=0.1).losses)
    with pytest.raises(ValueError, match=r"preference_prob must lie in \[0, 1\]"):
        losses.compute("soft_dpo", **pair(), preference_prob=T([1.2]))
    with pytest.raises(MissingInputError, match="preference_prob"):
        losses.compute("soft_dpo", **pair())


def test_gdpo_hand_derived():
    # GDPO scales the margin by 2p - 1. Pair h = 3 (r_w = 2, r_l = -1), beta = 0.1, p = 0.8:
    #   z = 0.1 * 0.6 * 3 = 0.18, L = log(1 + e^-0.18) = 0.607192
    # Pair h = 2 (chosen -8, ref -7; rejected -9, ref -6: r_w = -1, r_l = -3), p = 0.7:
    #   z = 0.1 * 0.4 * 2 = 0.08, L = log(1 + e^-0.08) = 0.653947
    kw = dict(policy_chosen_logps=T([-10.0, -8.0]), policy_rejected_logps=T([-15.0, -9.0]),
              ref_chosen_logps=T([-12.0, -7.0]), ref_rejected_logps=T([-14.0, -6.0]))
    out = losses.compute("gdpo", **kw, beta=0.1, preference_prob=T([0.8, 0.7]))
    expected = [math.log1p(math.exp(-0.1 * (2 * 0.8 - 1) * 3)), math.log1p(math.exp(-0.1 * (2 * 0.7 - 1) * 2))]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.losses.tolist() == pytest.approx([0.607192, 0.653947], abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.2, -0.1]) and out.rejected_rewards.tolist() == pytest.approx([-0.1, -0.3])
    assert losses.get_spec("geometric_dpo") is losses.get_spec("gdpo")


def test_gdpo_reductions_and_the_tie():
    # p = 1: DPO exactly; p = 0.5: log 2 whatever the margin, and no gradient (a tie teaches nothing),
    # where soft_dpo still pulls sigma(beta h) towards 1/2
    one = losses.compute("gdpo", **pair(), preference_prob=T([1.0])).losses
    assert torch.allclose(one, losses.compute("dpo", **pair()).losses)
    kw = pair()
    kw["policy_chosen_logps"] = kw["policy_chosen_logps"].clone().requires_grad_(True)
    half = losses.compute("gdpo", **kw, preference_prob=T([0.5]))
    assert half.losses.item() == pytest.approx(math.log(2))
    half.losses.sum().backward()
    assert kw["policy_chosen_logps"].grad.item() == 0.0
    # p = 0.3 turns the pair around: the same loss as the swapped pair at p = 0.7
    swapped = pair(pc=-15.0, pr=-10.0, rc=-14.0, rr=-12.0)
    assert torch.allclose(losses.compute("gdpo", **pair(), preference_prob=T([0.3])).losses,
                          losses.compute("gdpo", **swapped, preference_prob=T([0.7])).losses)
    with pytest.raises(ValueError, match=r"preference_prob must lie in \[0, 1\]"):
        losses.compute("gdpo", **pair(), preference_prob=T([-0.1]))
    with pytest.raises(MissingInputError, match="preference_prob"):
        losses.compute("gdpo", **pair())


def test_rpo_adds_length_normalised_chosen_nll():
    # DPO 0.554355 + alpha * (10 / 5)
    out = losses.compute("rpo", **pair(), beta=0.1, alpha=1.0)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.3)) + 2.0, abs=1e-6)
    assert out.metrics["loss/nll"].item() == pytest.approx(2.0)
    assert torch.allclose(losses.compute("rpo", **pair(), alpha=0.0).losses, losses.compute("dpo", **pair()).losses)


def test_spin_has_dpo_form_with_lambda_as_beta():
    for beta in (0.1, 0.5):
        assert torch.allclose(losses.compute("spin", **pair(), beta=beta).losses,
                              losses.compute("dpo", **pair(), beta=beta).losses)
