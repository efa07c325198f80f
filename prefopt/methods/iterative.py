"""Iterative (online) DPO and Self-Rewarding Language Models.

Round t (t = 1 .. iterative.iterations), starting from π_t (round 1: model.name_or_path):

1. sample generate.num_samples (k >= 2) completions per prompt from π_t  → iter-t/generations.jsonl
2. score each with the judge (iterative.judge; ``self`` is π_t itself, Yuan et al. 2024);
   items the judge fails on are skipped and counted                    → iter-t/judgements.jsonl
3. pairs: ``best_worst`` (the best against the worst sample of a prompt) or ``all`` (every
   two samples of a prompt), kept when the score gap > iterative.min_gap → iter-t/pairs.jsonl
4. train one round of any paired loss; the reference is the round's starting model
   (``reference: previous``) or the first model (``initial``)             → iter-t/final/

This is the "iterative refinement" recipe of Xu et al. 2023 ("Some things are more CRINGE
than others") and Yuan et al. 2024, with the judge as the preference source. A round where
no prompt has two samples apart by more than min_gap stops the run, naming the round.
"""
from __future__ import annotations

import itertools
import logging

from prefopt.config import RunConfig
from prefopt.data.report import DataReport
from prefopt.errors import ConfigError
from prefopt.methods.rounds import Rounds, as_completion, write_jsonl

log = logging.getLogger("prefopt")


def make_pairs(prompt, texts: list[str], scores: list[float | None], mode: str, min_gap: float) -> list[dict]:
    """Pairs (chosen scored higher) among one prompt's samples that the judge scored, ordered
    by the judge; identical texts never pair, and an empty sample (EOS at once) makes no pair
    (a completion must have content to be trained on)."""
    scored = sorted(((s, t) for s, t in zip(scores, texts) if s is not None and t.strip()), key=lambda x: -x[0])
    if mode == "best_worst":
        candidates = [(scored[0], scored[-1])] if len(scored) >= 2 else []
    else:
        candidates = list(itertools.combinations(scored, 2))
    return [{"prompt": prompt, "chosen": as_completion(prompt, hi_t), "rejected": as_completion(prompt, lo_t),
             "score_chosen": hi_s, "score_rejected": lo_s}
            for (hi_s, hi_t), (lo_s, lo_t) in candidates if hi_s - lo_s > min_gap and hi_t != lo_t]


def round_judge(spec, sampler):
    """The round's judge; ``self`` is the round's starting policy π_t (Self-Rewarding), the
    model that just sampled."""
    from prefopt.judges import make_judge

    return make_judge(spec, model=sampler.model, tokenizer=sampler.tok)


def run_iterative(config: RunConfig) -> dict:
    from prefopt.generate import load_prompts, refuse_images
    from prefopt.judges import judge_all
    from prefopt.methods.rounds import round_sampler, sample_round

    it = config.iterative
    if config.generate.num_samples < 2:
        raise ConfigError("generate.num_samples must be >= 2 (pairs are formed among a prompt's samples)")
    if it.pairs not in ("best_worst", "all"):
        raise ConfigError(f"iterative.pairs must be 'best_worst' or 'all' (got {it.pairs!r})")
    source = config.generate.prompts or config.data.train
    if source is None:
        raise ConfigError("set generate.prompts (or data.train) to the prompts to sample from")
    rounds = Rounds(config, "iterative")
    report = DataReport("prompts", config.data.on_error)
    prompts = load_prompts(source, config.data, report)
    refuse_images(prompts, "iterative DPO", "its judges read the text only, so they would rank answers about "
                                            "an image they cannot see")
    initial = rounds.model_path
    base_seed = config.train.seed if config.generate.seed is None else config.generate.seed
    tokenizer_path = config.model.tokenizer or config.model.name_or_path
    for t in range(1, it.iterations + 1):
        folder = rounds.folder(t)
        tok_path = tokenizer_path if t == 1 else rounds.model_path
        sampler = round_sampler(config, rounds.model_path, tok_path)
        gens = sample_round(sampler, prompts, config, base_seed + t - 1, folder,
                            DataReport(f"round {t} prompts", config.data.on_error))
        judge = round_judge(it.judge, sampler)
        flat = [(g, s) for g in gens for s in g.samples]
        verdicts = judge_all(judge, [g.prompt for g, _ in flat], [s.text for _, s in flat])
        write_jsonl(folder / "judgements.jsonl",
                    [{"source": str(g.origin), "record_index": g.origin.index, "completion": s.text, "score": v,
                      "failure": dict(verdicts.failures).get(i)} for i, ((g, s), v) in
                     enumerate(zip(flat, verdicts.scores))])
        pairs, k = [], 0
        for g in gens:
            n = len(g.samples)
            pairs += make_pairs(g.prompt, [s.text for s in g.samples], verdicts.scores[k:k + n], it.pairs, it.min_gap)
            k += n
        scored = [v for v in verdicts.scores if v is not None]
        info = {"prompts": len(gens), "samples": len(flat), "judge": judge.describe(),
                "empty_samples": sum(1 for _, s in flat if not s.text.strip()),
                "judge_failures": verdicts.failure_counts(),
                "mean_score": sum(scored) / len(scored) if scored else None}
        if verdicts.failures:
            log.warning("iterative round %d: the judge failed on %d of %d samples (%s); they are skipped",
                        t, len(verdicts.failures), len(flat), verdicts.failure_counts())
        del sampler, judge  # free the sampling copy before the round trains
        reference = initial if it.reference == "initial" else None
        rounds.train(t, pairs, reference=reference, info=info)
    return {"final_model": rounds.model_path, "rounds": rounds.history}
