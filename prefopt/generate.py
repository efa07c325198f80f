"""Sampling from a policy: ``prefopt generate CONFIG.yaml`` and ``prefopt.generate``.

    prompts (any data format) ──encode_prompt──▶ token ids (chat template, as training)
        ──Sampler (transformers generate with KV cache | vLLM)──▶ n completions per prompt
        ──cut at EOS / stop string──▶ Generation(prompt, samples[text, num_tokens, finish_reason])
        ──▶ OUTPUT_DIR/generations.jsonl (+ generate_report.json)

Prompts are tokenised by the same ``Encoder`` as training data, so a completion sampled here
and trained on later continues exactly the ids it was sampled after. Batches are left-padded
(the prompt's last token is next to the first generated one; transformers derives position
ids from the attention mask). A prompt longer than ``data.max_length - max_new_tokens`` would
make samples that cannot be trained on: it is a bad record under ``data.on_error``.

``Sampler`` is the seam for other engines: ``TransformersSampler`` runs anywhere;
``VLLMSampler`` uses vLLM where a GPU user has it (no dependency here).

Prompts with images (a vision-language model, prefopt.vlm) are encoded by its processor as
training encodes them (image tokens expanded, pixel values made); ``TransformersSampler`` passes
the image tensors to ``generate`` (``sample(..., media=...)``; a sampler is only given them when a
batch has images), and each JSONL record lists the prompt's images. SPIN carries them into its
pairs. vLLM, and the methods that judge samples (iterative DPO, ``eval.generate``: the judges read
text only), refuse image prompts (``refuse_images``).
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from prefopt.config import DataConfig, GenerateConfig
from prefopt.data.report import DataReport
from prefopt.data.schema import Origin, PromptExample, RecordProblem, Text
from prefopt.errors import ConfigError

log = logging.getLogger("prefopt")


@dataclass
class Sample:
    text: str
    num_tokens: int          # tokens generated for it: up to and including a stop string, EOS excluded
    finish_reason: str       # "eos" | "stop" (a stop string) | "length" (max_new_tokens reached)
    token_ids: list[int] = field(default_factory=list, repr=False)  # what was sampled, EOS included when it ended

    def record(self) -> dict:
        return {"text": self.text, "num_tokens": self.num_tokens, "finish_reason": self.finish_reason}


@dataclass
class Generation:
    prompt: Text             # as read (text or messages)
    origin: Origin
    prompt_text: str         # rendered (chat template applied)
    prompt_ids: list[int]
    samples: list[Sample] = field(default_factory=list)
    images: list[str] = field(default_factory=list)                  # the prompt's images (paths or URLs)
    media: dict[str, Any] = field(default_factory=dict, repr=False)  # their tensors (pixel_values, ...)

    def record(self, settings: dict) -> dict:
        """One JSONL line: the prompt (and its images), each completion with its token count, the settings."""
        images = {"images": self.images} if self.images else {}
        return {"prompt": self.prompt, **images, "source": str(self.origin), "record_index": self.origin.index,
                "completions": [s.record() for s in self.samples], "prompt_tokens": len(self.prompt_ids),
                "sampling": settings}


def prompt_options(data_cfg: DataConfig) -> dict:
    """encode_prompts' truncation options from the data config (as training truncates)."""
    return {"max_prompt_length": data_cfg.max_prompt_length, "keep_end": data_cfg.prompt_truncation == "keep_end"}


def sampling_settings(cfg: GenerateConfig, seed: int) -> dict:
    return {"num_samples": cfg.num_samples, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
            "top_p": cfg.top_p, "top_k": cfg.top_k, "stop": list(cfg.stop), "seed": seed,
            "batch_size": cfg.batch_size, "backend": cfg.backend}


def check_settings(cfg: GenerateConfig) -> None:
    problems = []
    if cfg.num_samples < 1:
        problems.append(f"generate.num_samples must be >= 1 (got {cfg.num_samples}): n = 0 samples nothing")
    if cfg.max_new_tokens < 1:
        problems.append(f"generate.max_new_tokens must be >= 1 (got {cfg.max_new_tokens})")
    if cfg.temperature < 0:
        problems.append(f"generate.temperature must be >= 0 (got {cfg.temperature}; 0 is greedy)")
    if not 0 < cfg.top_p <= 1:
        problems.append(f"generate.top_p must be in (0, 1] (got {cfg.top_p})")
    if cfg.top_k < 0:
        problems.append(f"generate.top_k must be >= 0 (got {cfg.top_k}; 0: no limit)")
    if cfg.batch_size < 1:
        problems.append(f"generate.batch_size must be >= 1 (got {cfg.batch_size})")
    if any(not isinstance(s, str) or not s for s in cfg.stop):
        problems.append(f"generate.stop must be a list of non-empty strings (got {cfg.stop!r})")
    if problems:
        raise ConfigError("; ".join(problems))


# ----------------------------------------------------------------------------- prompts

def load_prompts(source: Any, data_cfg: DataConfig, report: DataReport) -> list[PromptExample]:
    """The prompt of every record of ``source``, in order (any data format; images kept)."""
    from prefopt.data.pipeline import load_examples

    return [ex if isinstance(ex, PromptExample) else PromptExample(ex.prompt, ex.origin, ex.extras)
            for ex in load_examples(source, data_cfg, report)]


def refuse_images(prompts: list, what: str, why: str) -> None:
    """Stop, naming the first prompt with images (a PromptExample or a Generation), where ``what``
    cannot take them (``why``)."""
    from prefopt.vlm import IMAGE_EXTRAS

    first = next((p for p in prompts if getattr(p, "images", None) or getattr(p, "extras", {}).get(IMAGE_EXTRAS)),
                 None)
    if first is not None:
        raise ConfigError(f"{what} does not take prompts with images (the first is at {first.origin}): {why}. "
                          f"Image prompts work with prefopt generate and SPIN")


def encode_prompts(prompts: list, tokenizer, max_length: int, max_new_tokens: int, report: DataReport,
                   max_prompt_length: int | None = None, keep_end: bool = True) -> list[Generation]:
    """Render and tokenise each prompt, truncated to ``max_prompt_length`` as training truncates
    it (counted as ``prompt_truncated``); one that then leaves fewer than ``max_new_tokens`` of
    ``max_length`` is a bad record (stops, or is skipped and counted under on_error=skip)."""
    from prefopt.data.tokenize import Encoder
    from prefopt.vlm import IMAGE_EXTRAS, IMAGE_PATHS

    encoder = Encoder(tokenizer, max(max_length, 2), prompt_truncation="keep_end" if keep_end else "keep_start")
    budget = max_length - max_new_tokens
    if budget < 1:
        raise ConfigError(f"generate.max_new_tokens ({max_new_tokens}) leaves no room for a prompt within "
                          f"data.max_length ({max_length})")
    out = []
    for i, p in enumerate(prompts):
        ex = p if isinstance(p, PromptExample) else PromptExample(p, Origin("<prompts>", i))
        images, media = ex.extras.get(IMAGE_EXTRAS), {}
        try:
            if images:
                text, ids, media = encoder.encode_image_prompt(ex.prompt, images)
            else:
                text, ids = encoder.encode_prompt(ex.prompt)
            if max_prompt_length is not None and len(ids) > max_prompt_length:
                if images:  # the image tensors need every image token
                    raise RecordProblem("too_long", f"the prompt has {len(ids)} tokens with its image tokens, more "
                                                    f"than data.max_prompt_length={max_prompt_length}, and image "
                                                    f"tokens cannot be cut")
                ids = encoder.cut_prompt(ids, max_prompt_length)  # as training cuts it (a leading BOS kept)
                text = tokenizer.decode(ids)
                report.count("prompt_truncated")
            if len(ids) > budget:
                raise RecordProblem("too_long", f"the prompt has {len(ids)} tokens; with generate.max_new_tokens="
                                                f"{max_new_tokens} at most {budget} fit in data.max_length={max_length}")
        except RecordProblem as problem:
            report.reject(ex.origin, problem.reason, str(problem), ex.prompt)
            continue
        out.append(Generation(ex.prompt, ex.origin, text, ids, images=list(ex.extras.get(IMAGE_PATHS, [])),
                              media=media))
    report.examples = len(out)
    return out


# ----------------------------------------------------------------------------- samplers

class Sampler(Protocol):
    def sample(self, prompt_ids: list[list[int]], cfg: GenerateConfig, seed: int) -> list[list[Sample]]:
        """``cfg.num_samples`` samples for each prompt, in order. A batch with images is also given
        ``media=``: each prompt's image tensors (``{}`` for a prompt without)."""


class TransformersSampler:
    """transformers' ``generate`` with the KV cache, left-padded batches."""

    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    def generation_config(self, cfg: GenerateConfig):
        from transformers import GenerationConfig

        # A complete config, so the model's own generation_config.json (e.g. an instruct model's
        # temperature 0.6) never changes what the user asked for.
        greedy = cfg.temperature == 0
        return GenerationConfig(
            max_new_tokens=cfg.max_new_tokens, do_sample=not greedy, num_beams=1,
            temperature=None if greedy else cfg.temperature, top_p=None if greedy else cfg.top_p,
            top_k=None if greedy else cfg.top_k, num_return_sequences=1 if greedy else cfg.num_samples,
            eos_token_id=self.eos, pad_token_id=self.pad, use_cache=True,
            stop_strings=list(cfg.stop) or None)

    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], cfg: GenerateConfig, seed: int,
               media: list[dict] | None = None) -> list[list[Sample]]:
        device = next(self.model.parameters()).device
        input_ids, attention_mask = left_padded(prompt_ids, self.pad, device)
        images = image_inputs(self.model, input_ids, media or [], device)
        width = input_ids.shape[1]
        torch.manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **images,
                                      generation_config=self.generation_config(cfg), tokenizer=self.tok)
        finally:
            self.model.train(was_training)
        new = out[:, width:].tolist()                   # (B * n, new tokens), prompt-major
        samples = [finish(ids, self.tok, self.eos, cfg.stop, cfg.max_new_tokens) for ids in new]
        if cfg.temperature == 0:  # greedy: one decode per prompt, the same for each of its n samples
            return [[s] * cfg.num_samples for s in samples]
        n = cfg.num_samples
        return [samples[i * n:(i + 1) * n] for i in range(len(prompt_ids))]


def image_inputs(model, input_ids: torch.Tensor, media: list[dict], device) -> dict:
    """The image tensors of a batch's prompts for ``generate``: concatenated in prompt order (the
    order of their image tokens, row-major; prompts without images add none), plus what a
    multi-modal RoPE model needs to place them (prefopt.vlm.modality_ids)."""
    from prefopt.vlm import modality_ids

    placed = [m for m in media if m]
    if not placed:
        return {}
    keys = set(placed[0])
    if any(set(m) != keys for m in placed):
        raise ValueError("the prompts' image tensors differ in kind; one processor makes them all")
    out = {k: torch.cat([m[k] for m in placed]).to(device) for k in sorted(keys)}
    return {**out, **modality_ids(model, input_ids, out)}


def left_padded(prompt_ids: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, longest): prompts padded on the left, so every
    prompt's last token is next to what is generated after it."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
    return input_ids, mask


class VLLMSampler:
    """vLLM's offline engine (GPU). Loads ``model.name_or_path`` itself; untested on CPU machines."""

    def __init__(self, name_or_path: str, tokenizer):
        try:
            from vllm import LLM  # noqa: F401
        except ImportError:
            raise ConfigError("generate.backend=vllm needs the vllm package (pip install vllm, on a CUDA "
                              "machine); use generate.backend=transformers elsewhere") from None
        self.name_or_path, self.tok, self.llm = name_or_path, tokenizer, None

    def sample(self, prompt_ids: list[list[int]], cfg: GenerateConfig, seed: int,
               media: list[dict] | None = None) -> list[list[Sample]]:
        from vllm import LLM, SamplingParams, TokensPrompt

        if media and any(media):
            raise ConfigError("generate.backend=vllm: prompts with images are not passed to vLLM by prefopt; "
                              "use generate.backend=transformers")
        if self.llm is None:
            self.llm = LLM(model=self.name_or_path, seed=seed)
        params = SamplingParams(n=cfg.num_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                                top_k=cfg.top_k or -1, max_tokens=cfg.max_new_tokens, stop=list(cfg.stop) or None,
                                seed=seed)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                    use_tqdm=False)
        return [[self._sample(o) for o in request.outputs] for request in outputs]

    def _sample(self, out) -> Sample:
        # vLLM: finish_reason "length" or "stop"; stop_reason None (EOS), the stop string, or a token id
        ids = list(out.token_ids)
        eos = bool(ids) and ids[-1] == self.tok.eos_token_id
        if out.finish_reason == "length":
            reason = "length"
        else:
            reason = "stop" if isinstance(out.stop_reason, str) else "eos"
        return Sample(out.text, len(ids) - eos, reason, ids)


def finish(ids: list[int], tokenizer, eos: int, stop: list[str], max_new_tokens: int) -> Sample:
    """A generated continuation cut at its first EOS, or before its first stop string."""
    reason, sampled = "length", ids
    if eos in ids:
        ids, reason = ids[:ids.index(eos)], "eos"
        sampled = ids + [eos]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [(text.find(s), s) for s in stop if s in text]
    if hits:
        cut, _ = min(hits)
        # tokens generated up to the one that completes the stop string
        used = next(k for k in range(1, len(ids) + 1)
                    if any(s in tokenizer.decode(ids[:k], skip_special_tokens=True) for s in stop))
        return Sample(text[:cut], used, "stop", ids[:used])
    return Sample(text, len(ids), reason, sampled)


# ----------------------------------------------------------------------------- driver

def process_group():
    """accelerate's process state when launched on several processes (``accelerate launch`` or
    torchrun), else None: generation then splits its batches over the processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        return PartialState()
    return None


def is_main_process() -> bool:
    """Files are written by one process only (every process holds the same gathered results)."""
    return int(os.environ.get("RANK", "0")) == 0


def generate(sampler: Sampler, generations: list[Generation], cfg: GenerateConfig, seed: int,
             accelerator=None, progress: bool = True) -> list[Generation]:
    """Fill each Generation's samples, ``cfg.batch_size`` prompts per call. Under several
    processes each takes every num_processes-th batch and the results are gathered in order
    on every process. Batch b is seeded with seed + b, so a batch's samples depend neither on
    the batches before it nor on the number of processes."""
    from prefopt import console

    check_settings(cfg)
    accelerator = accelerator or process_group()
    batches = [list(range(s, min(s + cfg.batch_size, len(generations))))
               for s in range(0, len(generations), cfg.batch_size)]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = batches[rank::world]
    done = []
    for b, indices in console.progress(list(zip(range(rank, len(batches), world), mine)), "generating", unit="batch",
                                       enabled=progress and rank == 0):
        ids = [generations[i].prompt_ids for i in indices]
        media = [generations[i].media for i in indices]
        samples = sampler.sample(ids, cfg, seed + b, media=media) if any(media) else sampler.sample(ids, cfg, seed + b)
        done += [(i, s) for i, s in zip(indices, samples)]
    if world > 1:
        from accelerate.utils import gather_object
        done = gather_object(done)
    for i, samples in done:
        generations[i].samples = samples
    return generations


def write_generations(generations: list[Generation], path: Path, settings: dict) -> None:
    if not is_main_process():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for g in generations:
            f.write(json.dumps(g.record(settings), ensure_ascii=False) + "\n")
    tmp.replace(path)


def summary(generations: list[Generation], seconds: float) -> dict:
    samples = [s for g in generations for s in g.samples]
    tokens = sum(s.num_tokens for s in samples)
    return {"prompts": len(generations), "samples": len(samples), "generated_tokens": tokens,
            "finish_reasons": dict(Counter(s.finish_reason for s in samples)),
            "empty_completions": sum(1 for s in samples if not s.text.strip()),
            "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 1) if seconds else None}


def inference_device() -> torch.device:
    """This process's device: its own GPU under a multi-process launch, else CUDA when present."""
    group = process_group()
    if group is not None:
        return group.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_inference_model(model_cfg, device: torch.device | str | None = None):
    """The policy for sampling: a full model directory or hub id, or a saved LoRA adapter
    (its base loaded and the adapter merged, which samples faster)."""
    from prefopt.models import disable_dropout, load_model

    model = load_model(model_cfg.name_or_path, model_cfg.dtype, model_cfg)  # an adapter is merged
    disable_dropout(model)
    return model.to(device if device is not None else inference_device()).eval()


def model_at(model_cfg, path) -> torch.nn.Module:
    """load_inference_model for ``path`` with the run's other model settings (dtype, attention,
    remote code); a saved adapter is merged, so no LoRA settings apply."""
    from prefopt.config import ModelConfig

    return load_inference_model(ModelConfig(**{**vars(model_cfg), "name_or_path": str(path), "lora": None}))


def run_generate(config) -> dict:
    """``prefopt generate``: sample from model.name_or_path for generate.prompts (or data.train)."""
    from prefopt.models import load_tokenizer

    cfg = config.generate
    check_settings(cfg)
    if config.model.name_or_path is None:
        raise ConfigError("set model.name_or_path (the model to sample from)")
    source = cfg.prompts or config.data.train
    if source is None:
        raise ConfigError("set generate.prompts (or data.train) to the prompts to sample from")
    seed = config.train.seed if cfg.seed is None else cfg.seed
    out_dir = Path(config.output_dir)
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.name_or_path, config.model.chat_template)
    report = DataReport("prompts", config.data.on_error)
    generations = encode_prompts(load_prompts(source, config.data, report), tokenizer, config.data.max_length,
                                 cfg.max_new_tokens, report, **prompt_options(config.data))
    log.info("data %s", report.summary())
    rejects = out_dir / "rejected_records.jsonl"
    if is_main_process():
        rejects.unlink(missing_ok=True)
        report.write_rejects(rejects)  # before any stop below: the reasons are never lost
    if not generations:
        raise ConfigError(f"no prompt of {source} can be sampled ({report.summary()})")
    if cfg.backend == "vllm":
        refuse_images(generations, "generate.backend=vllm",
                      "prefopt does not pass images to vLLM; use generate.backend=transformers")
        sampler: Sampler = VLLMSampler(config.model.name_or_path, tokenizer)
    else:
        sampler = TransformersSampler(load_inference_model(config.model), tokenizer)
    started, group = time.perf_counter(), process_group()
    generate(sampler, generations, cfg, seed, accelerator=group, progress=config.train.progress_bar)
    stats = {**summary(generations, time.perf_counter() - started), "processes": group.num_processes if group else 1}
    settings = sampling_settings(cfg, seed)
    path = Path(cfg.output) if cfg.output else out_dir / "generations.jsonl"
    write_generations(generations, path, settings)
    result = {"model": config.model.name_or_path, "prompts_source": str(source), "output": str(path),
              "sampling": settings, **stats, "data": report.as_dict()}
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "generate_report.json").write_text(json.dumps(result, indent=2))
    log.info("generated %d completions for %d prompts (%s) in %.1fs -> %s", stats["samples"], stats["prompts"],
             ", ".join(f"{k} {v}" for k, v in stats["finish_reasons"].items()), stats["seconds"], path)
    return result
