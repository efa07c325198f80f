"""``prefopt eval`` with ``eval.generate: true``: sample from each model and from the reference,
judge, and report reward, win rate, sampled KL and the reference's best-of-N (see
prefopt.eval.sampled). ``eval.sweep`` lists several models (checkpoints, or runs at several β):
each is evaluated against the same reference samples, and the reward-vs-KL table is written
to ``OUTPUT_DIR/reward_kl.csv`` and ``reward_kl.md``.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from prefopt.config import RunConfig
from prefopt.data.report import DataReport
from prefopt.errors import ConfigError
from prefopt.generate import is_main_process

log = logging.getLogger("prefopt")

TABLE = ("model", "reward", "reward_se", "kl", "kl_se", "win_rate", "wins", "ties", "losses", "judge_failures")


def run_sampled_eval(config: RunConfig) -> dict:
    from prefopt.eval.sampled import evaluate_samples, sample_logps
    from prefopt.generate import (TransformersSampler, encode_prompts, generate, load_prompts, model_at,
                                  prompt_options, refuse_images, sampling_settings, write_generations)
    from prefopt.judges import make_judge
    from prefopt.models import load_tokenizer

    ev, gen = config.eval, config.generate
    models = list(ev.sweep) or [config.model.name_or_path]
    if None in models:
        raise ConfigError("set model.name_or_path (or eval.sweep) to the model(s) to sample from")
    if config.reference.name_or_path is None:
        raise ConfigError("eval.generate: set reference.name_or_path (the model the samples, "
                          "KL and win rate are compared with)")
    source = gen.prompts or config.data.eval or config.data.train
    if source is None:
        raise ConfigError("eval.generate: set generate.prompts (or data.eval / data.train)")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = config.train.seed if gen.seed is None else gen.seed
    tok = load_tokenizer(config.model.tokenizer or models[0], config.model.chat_template)
    report = DataReport("prompts", config.data.on_error)
    prompts = load_prompts(source, config.data, report)[:ev.max_prompts or None]
    refuse_images(prompts, "eval.generate", "its judges read the text only and its sampled KL scores the "
                                            "samples without the images")

    def encoded():
        return encode_prompts(prompts, tok, config.data.max_length, gen.max_new_tokens,
                              DataReport("prompts", config.data.on_error), **prompt_options(config.data))

    judge = make_judge(ev.judge)
    reference = model_at(config.model, config.reference.name_or_path)
    ref_sampler = TransformersSampler(reference, tok)
    ref_gens = generate(ref_sampler, encoded(), gen, seed + 1, progress=config.train.progress_bar)
    write_generations(ref_gens, out / "samples" / "reference.jsonl", sampling_settings(gen, seed + 1))
    best_of = None
    if ev.best_of_n:
        best_cfg = type(gen)(**{**vars(gen), "num_samples": ev.best_of_n})
        best_of = generate(ref_sampler, encoded(), best_cfg, seed + 2, progress=config.train.progress_bar)
    rows = []
    for i, path in enumerate(models):
        policy = model_at(config.model, path)
        gens = generate(TransformersSampler(policy, tok), encoded(), gen, seed, progress=config.train.progress_bar)
        write_generations(gens, out / "samples" / f"policy-{i}.jsonl", sampling_settings(gen, seed))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        metrics = evaluate_samples(gens, ref_gens, judge, sample_logps(policy, gens, pad),
                                   sample_logps(reference, gens, pad), best_of)
        rows.append({"model": str(path), **metrics})
        log.info("sampled eval %s: reward %s, KL %s, win rate %s", path, _fmt(metrics["reward"]),
                 _fmt(metrics["kl"]), _fmt(metrics["win_rate"]))
        del policy
    result = {"reference": str(config.reference.name_or_path), "judge": judge.describe(),
              "prompts": len(ref_gens), "prompts_source": str(source), "sampling": sampling_settings(gen, seed),
              "data": report.as_dict(), "models": rows}
    if is_main_process():
        (out / "sampled_eval.json").write_text(json.dumps(result, indent=2))
        write_table(rows, out)
    return result


def write_table(rows: list[dict], out: Path) -> None:
    with (out / "reward_kl.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(TABLE) + " |", "|" + "---|" * len(TABLE)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in TABLE) + " |" for r in rows]
    (out / "reward_kl.md").write_text("\n".join(lines) + "\n")


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
