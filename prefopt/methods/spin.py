"""SPIN: Self-Play fIne-tuNing (Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language
Models to Strong Language Models", Algorithm 1).

Round t (t = 1 .. spin.iterations), starting from π_t (round 1: model.name_or_path):

1. for every SFT example (x, y), sample y' ~ π_t(·|x)          → iter-t/generations.jsonl
2. pairs (x, chosen = y, rejected = y')                        → iter-t/pairs.jsonl
3. train π_{t+1} on them with the ``spin`` loss (any paired loss works) against π_t as the
   reference (a frozen copy of the round's starting model)      → iter-t/final/

Round t samples with seed ``generate.seed + t - 1`` (train.seed when unset), so a round's
samples can be regenerated from its starting model. A sample equal to the target or empty
makes no pair (counted); a round with no pair stops the run, naming it. Prompts with images
(prefopt.vlm) are sampled with them, and the pairs list them (``images``) for the round's training.
"""
from __future__ import annotations

import logging
from pathlib import Path

from prefopt.config import RunConfig
from prefopt.data.report import DataReport
from prefopt.methods.rounds import Rounds, as_completion, completion_text, round_sampler, sample_round
from prefopt.generate import is_main_process

log = logging.getLogger("prefopt")


def sft_examples(config: RunConfig, out: Path) -> list:
    """The SFT data (prompt, target completion): any format with completions; pairs give their chosen."""
    from prefopt.data.pipeline import as_kind, load_examples

    if config.data.train is None:
        from prefopt.errors import ConfigError
        raise ConfigError("set data.train to the SFT data (prompts with the target completions)")
    report = DataReport("train", config.data.on_error)
    examples = as_kind(load_examples(config.data.train, config.data, report), "completion", report)
    report.examples = len(examples)
    rejects = out / "rejected_records.jsonl"
    if is_main_process():
        rejects.unlink(missing_ok=True)
        report.write_rejects(rejects)
    log.info("data %s", report.summary())
    return examples


def images_of(example) -> dict:
    """An example's images (prefopt.vlm), kept with its prompt: sampled from, then written with the
    round's pairs (their resolved paths or URLs) so the round trains on them too."""
    from prefopt.vlm import IMAGE_EXTRAS, IMAGE_PATHS

    return {k: example.extras[k] for k in (IMAGE_EXTRAS, IMAGE_PATHS) if k in example.extras}


def run_spin(config: RunConfig) -> dict:
    from prefopt.data.schema import PromptExample

    rounds = Rounds(config, "spin")
    examples = sft_examples(config, rounds.out)
    by_origin = {ex.origin: ex for ex in examples}  # Origin: source, record index, line
    base_seed = config.train.seed if config.generate.seed is None else config.generate.seed
    tokenizer_path = config.model.tokenizer or config.model.name_or_path
    for t in range(1, config.spin.iterations + 1):
        folder = rounds.folder(t)
        report = DataReport(f"round {t} prompts", config.data.on_error)
        prompts = [PromptExample(ex.prompt, ex.origin, images_of(ex)) for ex in examples]
        sampler = round_sampler(config, rounds.model_path, tokenizer_path if t == 1 else rounds.model_path)
        gens = sample_round(sampler, prompts, config, base_seed + t - 1, folder, report)
        del sampler  # free the sampling copy before the round trains
        pairs, skipped = [], {"identical_to_target": 0, "empty_generation": 0}
        for g in gens:
            target = by_origin[g.origin].completion
            for s in g.samples:
                if not s.text.strip():
                    skipped["empty_generation"] += 1
                elif s.text.strip() == completion_text(target).strip():
                    skipped["identical_to_target"] += 1
                else:
                    pairs.append({"prompt": g.prompt, "chosen": target, "rejected": as_completion(g.prompt, s.text),
                                  **({"images": g.images} if g.images else {}),
                                  "source": str(g.origin), "record_index": g.origin.index})
        info = {"prompts": len(gens), "samples": sum(len(g.samples) for g in gens),
                "prompts_rejected": dict(report.rejected), **skipped}
        rounds.train(t, pairs, info=info)
    return {"final_model": rounds.model_path, "rounds": rounds.history}
