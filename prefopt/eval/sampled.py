"""Evaluation by sampling: did alignment change what the model *says*, and at what KL cost?

For a policy πθ, its reference πref, a judge and some prompts:

* **reward**: the judge's mean score of πθ's samples (and of πref's, for comparison), with
  its standard error;
* **win rate** against the reference: sample j of πθ against sample j of πref for the same
  prompt, by the judge; a tie counts a half: (wins + ties / 2) / comparisons;
* **sampled KL(πθ ‖ πref)**: the mean over πθ's samples y ~ πθ(·|x) of
  Σ_t [log πθ(y_t | x, y<t) − log πref(y_t | x, y<t)], an unbiased Monte-Carlo estimate of
  the sequence-level KL (the quantity on the x-axis of the DPO paper's Figure 2), with its
  standard error;
* **best-of-N of the reference**: per prompt, the best judge score among N samples of πref,
  averaged: the baseline that costs no training (the DPO paper's "Best of N").

Items the judge fails on are counted (``judge_failures``) and left out of every mean.
Log-probs are those of the sampled token ids (EOS included when a sample ended with it),
scored by the same ``score_batch`` as training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prefopt.generate import Generation


@dataclass
class Estimate:
    mean: float | None
    se: float | None
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Estimate":
        n = len(values)
        if n == 0:
            return cls(None, None, 0)
        mean = sum(values) / n
        if n == 1:
            return cls(mean, None, 1)
        var = sum((v - mean) ** 2 for v in values) / (n - 1)
        return cls(mean, math.sqrt(var / n), n)


def win_rate(policy_scores: list[float | None], reference_scores: list[float | None]) -> dict:
    """Paired comparisons (None on either side: not compared)."""
    wins = ties = losses = 0
    for p, r in zip(policy_scores, reference_scores):
        if p is None or r is None:
            continue
        wins += p > r
        ties += p == r
        losses += p < r
    n = wins + ties + losses
    return {"win_rate": (wins + 0.5 * ties) / n if n else None, "wins": wins, "ties": ties, "losses": losses,
            "comparisons": n}


def sampled_kl(policy_logps: list[float], reference_logps: list[float]) -> Estimate:
    """KL(πθ ‖ πref) from samples of πθ: the mean of the sequence log-ratios."""
    return Estimate.of([p - r for p, r in zip(policy_logps, reference_logps)])


@torch.no_grad()
def sample_logps(model, generations: list[Generation], pad_id: int, batch_size: int = 8) -> list[float]:
    """Σ log p of each sample's token ids under ``model``, samples in order (prompt-major)."""
    from prefopt.data.collate import make_collator
    from prefopt.data.tokenize import EncodedExample
    from prefopt.logps import Scoring, score_batch

    items = [EncodedExample(g.prompt_ids, {"completion": s.token_ids}, g.origin)
             for g in generations for s in g.samples]
    out = [0.0] * len(items)
    todo = [i for i, ex in enumerate(items) if ex.completions["completion"]]  # an empty sample has log-prob 0
    collate = make_collator("padded", pad_id, ("completion",))
    scoring = Scoring.for_model(model)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            batch = collate([items[i] for i in chunk]).to(next(model.parameters()).device)
            logps = score_batch(model, batch, scoring, details=False).logps
            for i, seq in zip(chunk, batch.index["completion"].tolist()):
                out[i] = float(logps[seq])
    finally:
        model.train(was_training)
    return out


def evaluate_samples(policy_gens: list[Generation], reference_gens: list[Generation], judge,
                     policy_logps: list[float], reference_logps_of_policy: list[float],
                     best_of: list[Generation] | None = None) -> dict:
    """The metrics of the module docstring from samples already drawn and scored."""
    from prefopt.judges import judge_all

    def judged(gens):
        flat = [(g.prompt, s.text) for g in gens for s in g.samples]
        return judge_all(judge, [p for p, _ in flat], [t for _, t in flat])

    pol, ref = judged(policy_gens), judged(reference_gens)
    n = min(len(policy_gens[0].samples), len(reference_gens[0].samples)) if policy_gens else 0
    pairs_p, pairs_r = [], []
    for k, (gp, gr) in enumerate(zip(policy_gens, reference_gens)):
        base_p, base_r = k * len(gp.samples), k * len(gr.samples)
        for j in range(n):
            pairs_p.append(pol.scores[base_p + j])
            pairs_r.append(ref.scores[base_r + j])
    reward = Estimate.of([v for v in pol.scores if v is not None])
    ref_reward = Estimate.of([v for v in ref.scores if v is not None])
    kl = sampled_kl(policy_logps, reference_logps_of_policy)
    out = {"reward": reward.mean, "reward_se": reward.se, "reference_reward": ref_reward.mean,
           "reference_reward_se": ref_reward.se, **win_rate(pairs_p, pairs_r), "kl": kl.mean, "kl_se": kl.se,
           "samples": len(policy_logps),
           "judge_failures": len(pol.failures) + len(ref.failures)}
    if best_of:
        bon = judged(best_of)
        best, k = [], 0
        for g in best_of:
            scores = [v for v in bon.scores[k:k + len(g.samples)] if v is not None]
            k += len(g.samples)
            if scores:
                best.append(max(scores))
        est = Estimate.of(best)
        out.update(best_of_n=len(best_of[0].samples), best_of_n_reward=est.mean, best_of_n_reward_se=est.se)
        out["judge_failures"] += len(bon.failures)
    return out
