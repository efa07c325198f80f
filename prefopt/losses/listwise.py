"""Listwise losses: K ≥ 2 responses per prompt, ranked or scored (prefopt.data.formats.listwise).

Notation: for the responses y_1..y_K of a prompt x, ``r_k = log πθ(y_k|x) − log πref(y_k|x)``,
the implicit reward ``u_k = β·r_k``, and ``s_k`` the data's score of y_k (higher is better; for
one chosen and several rejected, the labels 1 and 0). The inputs are (B, K) tensors
(``policy_response_logps`` ...), responses best first, with ``response_mask`` marking each
example's real responses: K varies between examples, padded to the objective's K (see
prefopt.data.roles). Every loss also takes a pair (``compute`` with chosen/rejected inputs) as
K = 2, scored by the ``score_chosen``/``score_rejected`` columns when given.

Shared hand-check example (each docstring uses it): β = 0.1, three responses with
log πθ = (−10, −15, −12) and log πref = (−12, −14, −12.5), so r = (2, −1, 0.5) and
u = (0.2, −0.1, 0.05); scores s = (3, 1, 2), so the ranking is y_1 ≻ y_3 ≻ y_2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefopt.losses.base import LossInputs, LossOutput, MissingInputError, param, register

Tensor = torch.Tensor

_DPO_PL = ("Rafailov et al. 2023, Direct Preference Optimization, arXiv:2305.18290, Appendix A.3: eq. 18 (the "
           "Plackett–Luce model) and eq. 20 (its DPO objective)")
_NCA = ("Chen et al. 2024, Noise Contrastive Alignment of Language Models with Explicit Rewards, "
        "arXiv:2402.05369 (v3, NeurIPS 2024)")
_NCA_CODE = "the formula as the authors' code computes it (thu-ml/Noise-Contrastive-Alignment, NCATrainer.nca_loss)"


# ---------------------------------------------------------------------------------- helpers
@dataclass
class ListwiseParams:
    beta: float = param(0.1, "β of the implicit reward β·log(πθ/πref).", gt=0)
    max_responses: int = param(8, "Most responses per prompt the run takes (K). Every example is padded to "
                                  "it for free (padding repeats a response, which shares its sequence); a "
                                  "record with more responses is a bad record.", ge=2)


def as_list(inputs: LossInputs, need_scores: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(r, s, mask), each (B, K): log-ratios, scores and real-response mask. A pair is K = 2,
    scored by its score_chosen/score_rejected columns, else by the labels (1, 0)."""
    if inputs.policy_response_logps is not None:
        r = inputs.policy_response_logps - inputs.ref_response_logps
        return r, inputs.response_scores.to(r.dtype), inputs.response_mask.bool()
    r = torch.stack([inputs.policy_chosen_logps - inputs.ref_chosen_logps,
                     inputs.policy_rejected_logps - inputs.ref_rejected_logps], 1)
    if "score_chosen" in inputs.extras and "score_rejected" in inputs.extras:
        s = torch.stack([inputs.extras["score_chosen"], inputs.extras["score_rejected"]], 1).to(r)
    elif need_scores:
        raise MissingInputError("this loss needs explicit rewards: for a pair, the score_chosen and "
                                "score_rejected columns")
    else:
        s = torch.tensor([1.0, 0.0], dtype=r.dtype, device=r.device).expand_as(r)
    return r, s, torch.ones_like(r, dtype=torch.bool)


def _fill(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` with the padding positions at the dtype's lowest value: out of every (log-)softmax
    and logsumexp, yet finite, so no NaN reaches a gradient."""
    return values.masked_fill(~mask, torch.finfo(values.dtype).min)


def masked_log_softmax(values: Tensor, mask: Tensor) -> Tensor:
    """log softmax over each row's real positions; 0 at the padding."""
    return torch.where(mask, F.log_softmax(_fill(values, mask), -1), torch.zeros_like(values))


def best_first(values: Tensor, scores: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``values``, ``scores`` and ``mask`` reordered by score, best first (stable; padding last)."""
    order = torch.argsort(_fill(scores, mask), dim=1, descending=True, stable=True)
    return values.gather(1, order), scores.gather(1, order), mask.gather(1, order)


def ordered_pairs(scores: Tensor, mask: Tensor) -> Tensor:
    """(B, K, K) bool: [b, i, j] when response i is scored strictly above response j."""
    both = mask[:, :, None] & mask[:, None, :]
    return both & (scores[:, :, None] > scores[:, None, :])


def output(losses: Tensor, u: Tensor, scores: Tensor, mask: Tensor) -> LossOutput:
    """A LossOutput with every response's reward and, as TRL names them, the best response's
    reward (``chosen_rewards``) and the mean reward of the others (``rejected_rewards``)."""
    u = u.masked_fill(~mask, 0.0)
    best = _fill(scores, mask).argmax(1, keepdim=True)                                   # (B, 1)
    others = mask & (torch.arange(u.shape[1], device=u.device)[None] != best)
    rejected = (u * others).sum(1) / others.sum(1).clamp(min=1)
    return LossOutput(losses, u.gather(1, best).squeeze(1), rejected, response_rewards=u)


def metrics(rewards: Tensor, scores: Tensor, mask: Tensor) -> dict[str, tuple[Tensor, float]]:
    """(sum, count) for the accumulator: ``rewards/accuracies`` is the share of the pairs the data
    orders (strictly higher score) that the implicit rewards order the same way, over the step;
    ``rewards/position_k`` the mean reward of the k-th best response (k = 0 is the best)."""
    rewards = rewards.detach().float()
    pairs = ordered_pairs(scores, mask)
    right = pairs & (rewards[:, :, None] > rewards[:, None, :])
    out = {"rewards/accuracies": (right.sum().float(), float(pairs.sum()))}
    ranked, _, ranked_mask = best_first(rewards, scores, mask)
    for k in range(rewards.shape[1]):
        n = float(ranked_mask[:, k].sum())
        if n:
            out[f"rewards/position_{k}"] = ((ranked[:, k] * ranked_mask[:, k]).sum(), n)
    return out


def _check(name: str, *, strict: bool = False, unique_best: bool = False, explicit: bool = False):
    """A record check for loss ``name``: the record's ranking (``columns["ranking"]``) fits it."""
    def check(columns: dict, p) -> str | None:
        ranking = columns["ranking"]
        scores = ranking.scores
        if len(scores) > p.max_responses:
            return (f"{len(scores)} responses, more than loss '{name}' takes (max_responses="
                    f"{p.max_responses}; raise it)")
        if explicit and not ranking.explicit:
            return (f"loss '{name}' needs explicit rewards (a 'scores' list, or score_chosen/score_rejected "
                    f"for a pair); this record ranks a chosen above rejected responses without scores")
        ties = ranking.ties()
        if strict and ties:
            k = ties[0][0]
            return (f"loss '{name}' needs a strict ranking, but responses tie at score {scores[k]:g}"
                    + ("" if ranking.explicit else " (the rejected responses are not ranked among themselves)")
                    + "; dpo_multi_rejected, lipo and infonca accept ties")
        if unique_best and ties and ties[0][0] == 0:
            return f"loss '{name}' needs one best response, but two tie at the top score {scores[0]:g}"
        return None
    return check


# ---------------------------------------------------------------------------------- plackett_luce
@register(
    "plackett_luce", params=ListwiseParams, data="listwise", aliases=("dpo_plackett_luce",),
    record_check=_check("plackett_luce", strict=True),
    paper=_DPO_PL + ": the ranking likelihood under DPO's implicit reward",
    equation="−Σ_{k=1}^{K−1} log [exp(u_τ(k)) / Σ_{j=k}^{K} exp(u_τ(j))], u = β·r, τ = the data's ranking",
    summary="A full ranking of K responses (scores without ties): the likelihood of the whole order, "
            "not only of its top. K = 2 is DPO.")
def plackett_luce(inputs: LossInputs, p: ListwiseParams) -> LossOutput:
    """Plackett–Luce DPO: L = −Σ_{k=1}^{K−1} [u_τ(k) − log Σ_{j≥k} exp(u_τ(j))].

    The DPO paper, Appendix A.3, eq. 20: L = −log Π_{k=1}^{K} exp(u_τ(k)) / Σ_{j=k}^{K} exp(u_τ(j)),
    the Plackett–Luce model of eq. 18 under the implicit reward u = β·log πθ/πref: the best is
    picked from all K, the next from the K − 1 left, and so on. Its k = K factor is 1, so the sum
    here stops at K − 1. K = 2 is −log σ(u_w − u_l), DPO (the paper: "when K = 2, Equation 18
    reduces to the Bradley-Terry model"). The ranking must be strict (the data's record check
    refuses ties).

    Hand check (the module's example, ranking y_1 ≻ y_3 ≻ y_2: u sorted = (0.2, 0.05, −0.1)):
    log(e^0.2 + e^0.05 + e^−0.1) = 1.156098, log(e^0.05 + e^−0.1) = 0.670957;
    L = −(0.2 − 1.156098) − (0.05 − 0.670957) = 0.956098 + 0.620957 = 1.577055.
    At πθ = πref: log K! (log 6 = 1.791759 for K = 3; log 2 for K = 2).
    """
    r, s, mask = as_list(inputs)
    u = p.beta * r
    ranked, _, m = best_first(u, s, mask)
    k = u.shape[1]
    later = torch.ones(k, k, dtype=torch.bool, device=u.device).triu()        # (K, K): j ≥ k
    pool = later[None] & m[:, None, :]                                         # (B, K, K)
    lse = _fill(ranked[:, None, :].expand(-1, k, -1), pool).logsumexp(-1)      # (B, K)
    terms = torch.where(m, ranked - lse, torch.zeros_like(ranked))
    return output(-terms.sum(1), u, s, mask)


# ---------------------------------------------------------------------------------- dpo_multi_rejected
@register(
    "dpo_multi_rejected", params=ListwiseParams, data="listwise",
    record_check=_check("dpo_multi_rejected", unique_best=True),
    paper=_DPO_PL + ", the k = 1 factor of eq. 20 (the best response picked from all K); as S-DPO: Chen et al. "
                    "2024, On Softmax Direct Preference Optimization for Recommendation, arXiv:2406.09215, the "
                    "S-DPO loss",
    equation="−log [exp(u_w) / Σ_k exp(u_k)] = −log σ(−log Σ_{l≠w} exp(u_l − u_w)), u = β·r",
    summary="One chosen and several rejected (ties among the rejected are fine): a softmax of the "
            "chosen's implicit reward against all of them. K = 2 is DPO.")
def dpo_multi_rejected(inputs: LossInputs, p: ListwiseParams) -> LossOutput:
    """DPO with several rejected: L = log Σ_k exp(u_k) − u_w, w the best response.

    The top-1 Plackett–Luce likelihood: only which response is best counts, so the rejected
    need no order among themselves. With K = 2: log(e^u_w + e^u_l) − u_w = −log σ(u_w − u_l), DPO.

    Hand check (the module's example; y_1 is best): log(e^0.2 + e^−0.1 + e^0.05) − 0.2 =
    1.156098 − 0.2 = 0.956098. At πθ = πref: log K.
    """
    r, s, mask = as_list(inputs)
    u = p.beta * r
    ranked, _, m = best_first(u, s, mask)
    losses = _fill(ranked, m).logsumexp(1) - ranked[:, 0]
    return output(losses, u, s, mask)


# ---------------------------------------------------------------------------------- infonca / nca
@dataclass
class NCAParams(ListwiseParams):
    alpha: float = param(1.0, "α: temperature of the target softmax(s/α) over the responses' scores (the "
                              "authors' code's temperature_alpha); choose it on the scale of the scores (α → 0: "
                              "all weight on the best).", gt=0)


@register(
    "infonca", params=NCAParams, data="listwise", record_check=_check("infonca", explicit=True),
    paper=_NCA + ", §3 (InfoNCA); " + _NCA_CODE + ": cross-entropy from the reward softmax to the policy's",
    equation="−Σ_k softmax(s/α)_k · log softmax(u)_k, u = β·r",
    summary="K responses with explicit rewards (a reward model's scores): fits the policy's relative "
            "likelihoods to the reward distribution. A one-hot target (α → 0) is dpo_multi_rejected; "
            "K = 2 with it is DPO.")
def infonca(inputs: LossInputs, p: NCAParams) -> LossOutput:
    """InfoNCA: L = −Σ_k t_k·log p_k, t = softmax(s/α), p = softmax(u) over the K responses.

    The paper's §3; the formula is the authors' code's (``loss_type == "InfoNCA"`` in
    NCATrainer.nca_loss), with α their ``temperature_alpha`` (see the ``nca`` note on α).

    Hand check (the module's example, α = 1): t = softmax(3, 1, 2) = (0.665241, 0.090031, 0.244728);
    log p = u − 1.156098 = (−0.956098, −1.256098, −1.106098);
    L = 0.665241·0.956098 + 0.090031·1.256098 + 0.244728·1.106098 = 1.019817.
    """
    r, s, mask = as_list(inputs, need_scores=True)
    u = p.beta * r
    target = masked_log_softmax(s / p.alpha, mask).exp() * mask
    losses = -(target * masked_log_softmax(u, mask)).sum(1)
    return output(losses, u, s, mask)


@register(
    "nca", params=NCAParams, data="listwise", record_check=_check("nca", explicit=True),
    paper=_NCA + ", §4 (NCA); " + _NCA_CODE + ": each response classified on its own reward, weighted by the "
                 "reward softmax",
    equation="−Σ_k [softmax(s/α)_k · log σ(u_k) + (1/K)·log σ(−u_k)], u = β·r",
    summary="K responses with explicit rewards; optimises absolute likelihoods (the best response's goes "
            "up instead of all falling). A one-hot target at K = 2 is nca_pair.")
def nca(inputs: LossInputs, p: NCAParams) -> LossOutput:
    """NCA: L = −Σ_k [t_k·log σ(u_k) + (1/K)·log σ(−u_k)], t = softmax(s/α).

    The paper's §4 (InfoNCA is §3); the formula is the authors' code's (reward_trainer.py,
    NCATrainer.nca_loss, ``loss_type == "NCA"``: model rewards β·log-ratio, target
    softmax(score / temperature_alpha), ``−logsigmoid(−u).mean() − (target·logsigmoid(u)).sum(−1)``,
    the mean over the K responses being the 1/K). prefopt's α is the code's ``temperature_alpha``,
    which divides the scores; the code's own comment says the paper's α is its reciprocal, so α
    here is not the paper's symbol.

    With K = 2 and a one-hot target (α → 0 on distinct scores) this is ``nca_pair``:
    −log σ(u_w) − ½·log σ(−u_w) − ½·log σ(−u_l).

    Hand check (the module's example, α = 1; t as in ``infonca``): log σ(u) = (−0.598139, −0.744397,
    −0.668460), log σ(−u) = (−0.798139, −0.644397, −0.718460);
    L = 0.665241·0.598139 + 0.090031·0.744397 + 0.244728·0.668460 + (0.798139 + 0.644397 + 0.718460)/3
    = 0.397907 + 0.067019 + 0.163590 + 0.720332 = 1.348848. At πθ = πref: 2·log 2.
    """
    r, s, mask = as_list(inputs, need_scores=True)
    u = p.beta * r
    target = masked_log_softmax(s / p.alpha, mask).exp() * mask
    count = mask.sum(1, keepdim=True).to(u.dtype)
    terms = target * F.logsigmoid(u) + F.logsigmoid(-u) / count
    return output(-(terms * mask).sum(1), u, s, mask)


# ---------------------------------------------------------------------------------- lipo
@register(
    "lipo", params=ListwiseParams, data="listwise", aliases=("lipo_lambda",), record_check=_check("lipo"),
    paper="Liu et al. 2024, LiPO: Listwise Preference Optimization through Learning-to-Rank, arXiv:2402.01878 "
          "(v3, NAACL 2025), §3, eq. 8 (LiPO-λ, the LambdaLoss objective); log2 discount as the RAX "
          "dcg_lambdaweight of its Appendix B",
    equation="−Σ_{s_i > s_j} Δ_ij·log σ(u_i − u_j), Δ_ij = |G_i − G_j|·|1/D(τ_i) − 1/D(τ_j)|, "
             "G = 2^s − 1, D(τ) = log2(1 + τ), τ = rank by u",
    summary="Ranked or scored lists (ties allowed): a logistic loss on every ordered pair, weighted by "
            "how much swapping the two would change the list's DCG. Scores are the labels ψ as given "
            "(the paper's lie in [0, 1]: rescale large ratings).")
def lipo(inputs: LossInputs, p: ListwiseParams) -> LossOutput:
    """LiPO-λ: L = Σ_{i,j: s_i > s_j} Δ_ij·log(1 + e^−(u_i − u_j)), the lambda weights
    Δ_ij = |G_i − G_j|·|1/D(τ_i) − 1/D(τ_j)| held constant (no gradient), gains G = 2^s − 1,
    discounts D(τ) = log2(1 + τ), τ_i the 1-based rank of y_i by the policy's rewards u.

    The paper's eq. 8 (§3, arXiv v3), with its labels ψ (here s, in [0, 1] in the paper, §2.2)
    and scores s_i = β·log πθ/πref (eq. 2; here u): G_i = 2^ψ_i − 1 and D(τ(i)) = log(1 + τ(i)),
    τ(i) "the rank position of y_i in the ranking permutation induced by s". The paper writes the
    log without a base; its Appendix B computes the loss as ``rax.pairwise_logistic_loss(scores,
    labels, lambdaweight_fn=rax.dcg_lambdaweight)``, and RAX's default discount is
    1/log2(1 + rank), so prefopt uses log2 (a natural log would multiply every Δ_ij, and the loss,
    by 1/ln 2 = 1.442695). prefopt sums eq. 8's pairs as written; RAX's own reduction and weight
    scaling (some versions multiply the weights by the list size) are constant factors it leaves
    out. At K = 2, |1/D(1) − 1/D(2)| = 1 − 1/log2 3 = 0.369070 whatever the order, so with labels
    (1, 0) LiPO-λ is 0.369070·DPO. Pairs of equal scores get no term.

    Hand check (the module's u, labels s = (1, 0, 0.5)): G = (1, 0, 0.414214); τ = (1, 3, 2),
    1/D(τ) = (1, 0.5, 0.630930). Pairs: (1, 2): Δ = 1·0.5 = 0.5, log(1 + e^−0.3) = 0.554355;
    (1, 3): Δ = 0.585786·0.369070 = 0.216196, log(1 + e^−0.15) = 0.620957;
    (3, 2): Δ = 0.414214·0.130930 = 0.054233, log(1 + e^−0.15) = 0.620957;
    L = 0.277178 + 0.134248 + 0.033676 = 0.445103.
    """
    r, s, mask = as_list(inputs)
    u = p.beta * r
    k = u.shape[1]
    with torch.no_grad():
        order = torch.argsort(_fill(u.detach(), mask), dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(1, k + 1, device=u.device).expand_as(order))
        inv_discount = torch.where(mask, 1.0 / torch.log2(1.0 + rank.to(u.dtype)), torch.zeros_like(u))
        gain = torch.pow(2.0, s) - 1
        weight = ((gain[:, :, None] - gain[:, None, :]).abs()
                  * (inv_discount[:, :, None] - inv_discount[:, None, :]).abs())
        weight = weight * ordered_pairs(s, mask)
    pairwise = F.softplus(-(u[:, :, None] - u[:, None, :]))                   # (B, K, K)
    return output((weight * pairwise).sum((1, 2)), u, s, mask)


# ---------------------------------------------------------------------------------- exo
@dataclass
class EXOListParams(ListwiseParams):
    beta_r: float = param(1.0, "β_r: temperature of the reward distribution softmax(s/β_r); choose it on "
                               "the scale of the scores.", gt=0)


@register(
    "exo", params=EXOListParams, data="listwise", record_check=_check("exo", explicit=True),
    paper="Ji et al. 2024, Towards Efficient Exact Optimization of Language Model Alignment (EXO), "
          "arXiv:2402.00856, the K-sample EXO objective (§3.2, as TRL cites it): the reverse KL between the "
          "policy's and the reward's distributions over the K samples, as the authors' code computes it "
          "(haozheji/exact-optimization, exact_loss, loss_type exo-rw)",
    equation="Σ_k p_k·(log p_k − log q_k), p = softmax(β·r), q = softmax(s/β_r)",
    summary="K responses with explicit rewards: mode-seeking (reverse KL), so the policy concentrates on "
            "the best responses. exo_pair is the K = 2 case with a label-smoothed target.")
def exo(inputs: LossInputs, p: EXOListParams) -> LossOutput:
    """EXO: L = KL(p ‖ q) = Σ_k p_k·(log p_k − log q_k), p = softmax(u), q = softmax(s/β_r).

    The authors' ``exact_loss`` (loss_type ``exo-rw``) line for line: p = softmax(beta_model·Σ log
    πθ/πref) over the K samples of a prompt, q = softmax(rewards / beta), L = Σ p·(log p − log q);
    their ``beta_model`` is β here, their ``beta`` is β_r.

    With K = 2, q = (σ(Δs/β_r), σ(−Δs/β_r)); scores with Δs/β_r = log((1−ε)/ε) give q = (1−ε, ε),
    the target of ``exo_pair``, and the same loss.

    Hand check (the module's example, β_r = 1): p = exp(u − 1.156098) = (0.384390, 0.284763, 0.330847);
    log q = log softmax(3, 1, 2) = (−0.407606, −2.407606, −1.407606);
    L = 0.384390·(−0.956098 + 0.407606) + 0.284763·(−1.256098 + 2.407606)
    + 0.330847·(−1.106098 + 1.407606) = −0.210835 + 0.327907 + 0.099753 = 0.216825.
    """
    r, s, mask = as_list(inputs, need_scores=True)
    u = p.beta * r
    log_p = masked_log_softmax(u, mask)
    log_q = masked_log_softmax(s / p.beta_r, mask)
    losses = (log_p.exp() * (log_p - log_q) * mask).sum(1)
    return output(losses, u, s, mask)

