"""The losses against the equations of their papers, as the papers number them, and against the
code their authors (or TRL 1.16) run: each test writes the cited formula out on its own, with
numbers where the ranking/weighting is easy to get wrong, and compares prefopt's value with it.

Where it was checked (see the loss docstrings): DPO Appendix A.3 eqs. 18 and 20 and LiPO §3
eq. 8 from the papers' text; NCA/InfoNCA, EXO, ODPO and TPO from the authors' released loss
code; CPO and AlphaPO by running TRL 1.16's own CPOTrainer.cpo_loss.
"""
from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

from prefopt import losses

T = torch.tensor

# K = 4 responses of two prompts (the NCA authors' code is written for K = 4).
POLICY = T([[-10.0, -15.0, -12.0, -20.0], [-7.0, -6.0, -9.0, -8.5]])
REF = T([[-12.0, -14.0, -12.5, -18.0], [-8.0, -6.5, -8.0, -9.0]])
SCORES = T([[3.0, 1.0, 2.0, 0.5], [0.9, 0.7, 0.2, 0.4]])


def listwise(name, scores=SCORES, **params):
    return losses.compute(name, policy_response_logps=POLICY, ref_response_logps=REF, response_scores=scores,
                          response_mask=torch.ones_like(POLICY, dtype=torch.bool), **params).losses


# ------------------------------------------------------------------ DPO, Appendix A.3, eq. 20
def test_plackett_luce_is_dpo_eq_20_with_its_k_equals_k_factor():
    # L = −log Π_{k=1}^{K} exp(u_τ(k)) / Σ_{j=k}^{K} exp(u_τ(j)), τ the ranking by score, all K factors
    beta = 0.1
    want = []
    for b in range(2):
        u = beta * (POLICY[b] - REF[b])
        ranked = u[torch.argsort(SCORES[b], descending=True)]
        want.append(-sum(ranked[k] - torch.logsumexp(ranked[k:], 0) for k in range(4)))
    assert torch.allclose(listwise("plackett_luce", beta=beta), torch.stack(want), atol=1e-6)


# ------------------------------------------------------------------ LiPO §3, eq. 8
def test_lipo_is_eq_8_with_raxs_default_dcg_lambdaweight():
    # Δ_ij = |G_i − G_j|·|1/D(τ_i) − 1/D(τ_j)|, G = 2^ψ − 1, 1/D(τ) = 1/log2(1 + τ) (RAX's default
    # discount), τ the 1-based rank by the model scores s = β·log-ratio; sum over ψ_i > ψ_j.
    beta = 0.05  # the paper's β (§5)
    want = []
    for b in range(2):
        s, psi = beta * (POLICY[b] - REF[b]), SCORES[b] / 3.0  # labels in [0, 1], as the paper's
        rank = torch.empty(4)
        rank[torch.argsort(s, descending=True)] = torch.arange(1.0, 5.0)
        gain, inv_d = 2 ** psi - 1, 1 / torch.log2(1 + rank)
        want.append(sum((gain[i] - gain[j]).abs() * (inv_d[i] - inv_d[j]).abs() * F.softplus(-(s[i] - s[j]))
                        for i in range(4) for j in range(4) if psi[i] > psi[j]))
    assert torch.allclose(listwise("lipo", scores=SCORES / 3.0, beta=beta), torch.stack(want), atol=1e-6)


def test_lipo_discount_is_log2_not_natural_log():
    # K = 2: |1/D(1) − 1/D(2)| is 1 − 1/log2 3 with RAX's log2, (1/ln 2)·that with a natural log
    pair = dict(policy_chosen_logps=T([-10.0]), policy_rejected_logps=T([-15.0]), ref_chosen_logps=T([-12.0]),
                ref_rejected_logps=T([-14.0]))
    dpo = losses.compute("dpo", beta=0.1, **pair).losses
    lipo = losses.compute("lipo", beta=0.1, **pair).losses
    assert lipo.item() == pytest.approx((1 - 1 / math.log2(3)) * dpo.item(), abs=1e-7)
    assert lipo.item() != pytest.approx((1 / math.log(2) - 1 / math.log(3)) * dpo.item(), abs=1e-3)


# ------------------------------------------------------------------ NCA / InfoNCA, the authors' code
def test_infonca_and_nca_match_the_authors_nca_loss():
    # thu-ml/Noise-Contrastive-Alignment, NCATrainer.nca_loss: rewards = β·log-ratio, target =
    # softmax(score / temperature_alpha); InfoNCA = −Σ target·log_softmax(rewards); NCA =
    # −mean over all (prompt, response) of logsigmoid(−rewards) − mean over prompts of
    # Σ target·logsigmoid(rewards). prefopt's per-prompt losses, averaged, must give the same number.
    beta, temperature = 0.1, 0.5
    rewards = beta * (POLICY - REF)
    target = (SCORES / temperature).softmax(-1)
    infonca = -(target * rewards.log_softmax(-1)).sum(-1)
    nca_batch = -F.logsigmoid(-rewards).mean() - (target * F.logsigmoid(rewards)).sum(-1).mean()
    assert torch.allclose(listwise("infonca", beta=beta, alpha=temperature), infonca, atol=1e-6)
    assert listwise("nca", beta=beta, alpha=temperature).mean().item() == pytest.approx(nca_batch.item(), abs=1e-6)


# ------------------------------------------------------------------ EXO, the authors' exact_loss (exo-rw)
def test_exo_matches_the_authors_exo_rw_loss():
    # haozheji/exact-optimization, exact_loss with loss_type exo-rw: log p = log_softmax(beta_model·
    # log-ratio) over the K samples, log q = log_softmax(rewards / beta), L = Σ p·(log p − log q)
    beta_model, beta = 0.1, 2.0
    log_p = (beta_model * (POLICY - REF)).log_softmax(-1)
    log_q = (SCORES / beta).log_softmax(-1)
    want = (log_p.exp() * (log_p - log_q)).sum(-1)
    assert torch.allclose(listwise("exo", beta=beta_model, beta_r=beta), want, atol=1e-6)


# ------------------------------------------------------------------ ODPO, the authors' preference_loss
PAIRS = dict(policy_chosen_logps=T([-10.0, -20.0]), policy_rejected_logps=T([-15.0, -22.0]),
             ref_chosen_logps=T([-12.0, -19.0]), ref_rejected_logps=T([-14.0, -23.0]))


@pytest.mark.parametrize("offset", ["scores", "log_ratio"])
def test_odpo_matches_the_authors_preference_loss(offset):
    # rycolab/odpo, trainers.py preference_loss(offset=True): −logsigmoid(β·h − α·log(r_w − r_l)),
    # with ratio=True the log of r_w / r_l instead (prefopt's offset: log_ratio)
    beta, alpha, r_w, r_l = 0.5, 0.5, T([8.0, 0.9]), T([3.0, 0.4])
    h = (PAIRS["policy_chosen_logps"] - PAIRS["policy_rejected_logps"]) - (
        PAIRS["ref_chosen_logps"] - PAIRS["ref_rejected_logps"])
    margin = torch.log(r_w / r_l if offset == "log_ratio" else r_w - r_l)
    want = -F.logsigmoid(beta * h - alpha * margin)
    got = losses.compute("odpo", **PAIRS, score_chosen=r_w, score_rejected=r_l, beta=beta, alpha=alpha,
                         offset=offset).losses
    assert torch.allclose(got, want, atol=1e-6)


# ------------------------------------------------------------------ TPO, the authors' tpo_loss
def test_tpo_and_tpo_l_match_the_authors_tpo_loss():
    # sahsaeedi/TPO, tpo_loss: sigmoid on summed log-probs; tpo-l on length-averaged log-probs with
    # logits − γ/β; both plus tpo_alpha·NLL of the reference (gold) response
    pc, pr, lc, lr = T([-10.0, -6.0]), T([-15.0, -4.0]), T([5, 2]), T([3, 1])
    gold, gold_len = T([-12.0, -3.0]), T([4, 3])
    kw = dict(policy_chosen_logps=pc, policy_rejected_logps=pr, chosen_lengths=lc, rejected_lengths=lr,
              policy_ref_completion_logps=gold, ref_completion_lengths=gold_len)
    nll = -gold / gold_len
    beta = 0.1
    want = -F.logsigmoid(beta * (pc - pr)) + nll
    assert torch.allclose(losses.compute("tpo", **kw, beta=beta, alpha=1.0).losses, want, atol=1e-6)
    beta, gamma = 2.0, 1.6
    want = -F.logsigmoid(beta * ((pc / lc - pr / lr) - gamma / beta)) + nll
    assert torch.allclose(losses.compute("tpo_l", **kw, beta=beta, gamma=gamma, alpha=1.0).losses, want, atol=1e-6)


# ------------------------------------------------------------------ CPO / AlphaPO: TRL 1.16 itself
def trl_cpo_loss(chosen, rejected, **settings):
    """TRL 1.16's CPOTrainer.cpo_loss on the given (already summed or averaged) log-probs."""
    pytest.importorskip("trl")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo.cpo_trainer import CPOTrainer
    trainer = types.SimpleNamespace(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", simpo_gamma=0.5, alpha=0.0,
                                    accelerator=types.SimpleNamespace(device="cpu"))
    vars(trainer).update(settings)
    return CPOTrainer.cpo_loss(trainer, chosen, rejected)


PC, PR, LC, LR = T([-10.0, -6.0, -3.0]), T([-15.0, -4.0, -9.0]), T([5, 2, 3]), T([3, 1, 4])
REF_FREE = dict(policy_chosen_logps=PC, policy_rejected_logps=PR, chosen_lengths=LC, rejected_lengths=LR)


@pytest.mark.parametrize("loss, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_cpo_preference_term_is_trls_cpo_loss(loss, smoothing):
    averaged = loss == "ipo"  # TRL averages the log-probs for ipo (and simpo)
    chosen, rejected = (PC / LC, PR / LR) if averaged else (PC, PR)
    want, want_w, want_l = trl_cpo_loss(chosen, rejected, loss_type=loss, beta=0.2, label_smoothing=smoothing)
    out = losses.compute("cpo", **REF_FREE, loss=loss, beta=0.2, alpha=0.0, label_smoothing=smoothing)
    assert torch.allclose(out.losses, want, atol=1e-6)
    assert torch.allclose(out.chosen_rewards, want_w) and torch.allclose(out.rejected_rewards, want_l)


@pytest.mark.parametrize("alpha", [0.0, 0.25, -0.5, 1.0])
def test_alphapo_is_trls_cpo_loss_with_loss_type_alphapo(alpha):
    # CPOConfig(loss_type="alphapo") sets loss_type simpo and cpo_alpha 0: length-averaged log-probs,
    # r = (1 − p^(−α))/α, then −log σ(β·(r_w − r_l) − γ)
    want, want_w, want_l = trl_cpo_loss(PC / LC, PR / LR, loss_type="simpo", alpha=alpha, beta=2.5,
                                        simpo_gamma=1.375, label_smoothing=0.1)
    out = losses.compute("alphapo", **REF_FREE, alpha=alpha, beta=2.5, gamma=1.375, label_smoothing=0.1)
    assert torch.allclose(out.losses, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out.chosen_rewards, want_w, rtol=1e-5) and torch.allclose(out.rejected_rewards, want_l,
                                                                                       rtol=1e-5)
