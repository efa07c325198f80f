"""What every multi-round method shares: a model that moves from round to round, one folder
per round, pairs written before they are trained on, and a summary that says what each
round did.

    OUTPUT_DIR/iter-1/   generations.jsonl  pairs.jsonl  metrics.jsonl  config.yaml  final/
    OUTPUT_DIR/iter-2/   ...
    OUTPUT_DIR/summary.json

A round is an ordinary ``Trainer`` run on that round's pairs (so layouts, LoRA, precision,
checkpoints and metrics are the trainer's, unchanged). Under LoRA each round's adapter is
merged into its final model, so the next round starts from, and by default refers to, a
plain model: the adapter-disabled reference of round t+1 is then exactly round t's policy.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

from prefopt.config import RunConfig, save_config
from prefopt.errors import PrefoptError
from prefopt.generate import is_main_process

log = logging.getLogger("prefopt")


class RoundError(PrefoptError):
    """A round that cannot go on (no pairs, ...): names the round and the reason."""


class Rounds:
    def __init__(self, config: RunConfig, method: str):
        if config.model.name_or_path is None:
            raise RoundError("set model.name_or_path (the model the first round starts from)")
        self.config, self.method = config, method
        self.out = Path(config.output_dir)
        done = sorted(p.name for p in self.out.glob("iter-*") if (p / "final").is_dir() or (p / "checkpoints").is_dir())
        if done and not config.train.overwrite_output_dir:
            raise RoundError(f"{self.out} holds the rounds of an earlier run ({', '.join(done)}); choose another "
                             f"output_dir, or set train.overwrite_output_dir=true to replace them (rounds do not "
                             f"resume: each is short and starts from the previous round's final model)")
        self.model_path = str(config.model.name_or_path)   # the policy the next round starts from
        self.history: list[dict] = []
        self.started = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        if is_main_process():
            save_config(config, self.out / "config.yaml")

    def folder(self, t: int) -> Path:
        path = self.out / f"iter-{t}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def round_config(self, t: int, reference: str | None) -> RunConfig:
        """The trainer config of round t: the user's, starting from the current model, with
        ``reference`` (None: a frozen copy of the round's starting model)."""
        cfg = copy.deepcopy(self.config)
        cfg.output_dir = str(self.folder(t))
        cfg.model.name_or_path = self.model_path
        cfg.data.train, cfg.data.eval = None, None
        cfg.data.eval_split_size = 0.0
        cfg.train.resume_from = None
        cfg.reference.name_or_path = reference
        if cfg.model.lora:
            cfg.save.merge_lora = True
        return cfg

    def train(self, t: int, pairs: list[dict] | str, reference: str | None = None,
              eval_pairs: list[dict] | None = None, info: dict | None = None) -> dict:
        """Train round t on ``pairs`` (records, written to iter-t/pairs.jsonl first; or a data
        source, read by the trainer); the next round starts from its final model."""
        from prefopt.trainer import Trainer

        folder = self.folder(t)
        if not isinstance(pairs, str):
            write_jsonl(folder / "pairs.jsonl", pairs)
        if not pairs:
            self.record(t, {**(info or {}), "pairs": 0, "stopped": "no pairs"})
            raise RoundError(f"round {t} produced no pairs ({describe(info)}); "
                             f"what it made is in {folder}")
        cfg = self.round_config(t, reference)
        log.info("%s round %d: %d pairs, from %s, reference %s", self.method, t, len(pairs), self.model_path,
                 reference or "a frozen copy of the round's starting model")
        trainer = Trainer(args=cfg, train_dataset=pairs, eval_dataset=eval_pairs or None)
        trainer.train()
        metrics = trainer.final_eval
        start = self.model_path
        self.model_path = str(folder / "final")
        self.record(t, {**(info or {}), "pairs": pairs if isinstance(pairs, str) else len(pairs),
                        "started_from": start, "reference": reference or f"frozen copy of {start}",
                        "reference_weights": reference_fingerprint(trainer), "model": self.model_path,
                        "eval": metrics})
        return metrics

    def record(self, t: int, values: dict) -> None:
        self.history.append({"round": t, **values})
        summary = {"method": self.method, "rounds": self.history, "final_model": self.model_path,
                   "seconds": round(time.time() - self.started, 1)}
        if is_main_process():
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def round_sampler(config: RunConfig, model_path: str, tokenizer_path: str):
    """A sampler over the round's starting model (its tokenizer from ``tokenizer_path``)."""
    from prefopt.generate import TransformersSampler, model_at
    from prefopt.models import load_tokenizer

    return TransformersSampler(model_at(config.model, model_path), load_tokenizer(tokenizer_path,
                                                                                 config.model.chat_template))


def sample_round(sampler, prompts: list, config: RunConfig, seed: int, folder: Path, report):
    """Sample config.generate for ``prompts`` (tokenised and truncated as training does);
    writes folder/generations.jsonl."""
    from prefopt.generate import encode_prompts, generate, prompt_options, sampling_settings, write_generations

    gens = encode_prompts(prompts, sampler.tok, config.data.max_length, config.generate.max_new_tokens, report,
                          **prompt_options(config.data))
    generate(sampler, gens, config.generate, seed, progress=config.train.progress_bar)
    write_generations(gens, folder / "generations.jsonl", sampling_settings(config.generate, seed))
    return gens


def reference_fingerprint(trainer) -> str | None:
    """A hash of the reference weights the round trained against (None when it kept no model,
    e.g. a precomputed reference after its pre-pass)."""
    from prefopt.reference.precomputed import weights_fingerprint

    model = getattr(getattr(trainer.job.objective, "reference", None), "model", None) if trainer.job else None
    return None if model is None else weights_fingerprint(model, sharded=False)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    if not is_main_process():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def describe(info: dict | None) -> str:
    return ", ".join(f"{k}: {v}" for k, v in (info or {}).items() if v) or "nothing to report"


def as_completion(prompt, text: str):
    """A sampled text in the form of its prompt: text, or one assistant message."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def completion_text(completion) -> str:
    """The text of a completion (text, or the content of its assistant messages)."""
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion if m.get("role") == "assistant")
