"""The run configuration: nested dataclasses are the single source of truth.

Every field carries its help text once (``option(default, help)``); YAML is only a
serialisation of these classes, the CLI's ``prefopt keys`` prints them, and the Python
API's ``DPOConfig(...)``/``SFTConfig(...)`` build the same object from flat keyword
arguments (``learning_rate=...`` is routed to ``train.learning_rate``).

Unknown keys are errors that name the closest valid key. Losses are named by their
registry key (``loss: {name: ipo, beta: 0.5}``) and their parameters are checked
against that loss's parameter class, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from prefopt.coerce import coerce
from prefopt.config_source import blame, deep_merge, read_yaml_located
from prefopt.errors import ConfigError, did_you_mean
from prefopt.losses import get_spec
from prefopt.losses.modifiers import MODIFIERS


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
           factory: Any = dataclasses.MISSING):
    """A dataclass field with its help text and, optionally, the values it accepts."""
    meta = {"help": help, "choices": choices}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name_or_path: str | None = option(
        None, "Policy model: a hub id ('org/name') or a local directory, loaded with "
              "AutoModelForCausalLM.from_pretrained.")
    tokenizer: str | None = option(None, "Tokenizer hub id or directory; defaults to name_or_path.")
    dtype: str = option("float32", "dtype the weights are loaded in. Keep float32 with "
                        "train.mixed_precision=bf16 for mixed precision.",
                        choices=("float32", "bfloat16", "float16", "auto"))
    attn_implementation: str | None = option(
        None, "Attention kernel passed to from_pretrained (eager, sdpa, flash_attention_2); "
              "None lets transformers choose.")
    chat_template: str | None = option(
        None, "Override the tokenizer's chat template: 'chatml' or a Jinja template string.")
    trust_remote_code: bool = option(False, "Allow custom modelling code from the model repository.")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.")
    lora: dict | None = option(
        None, "Train LoRA adapters instead of every weight (peft): a mapping of LoraConfig fields, "
              "e.g. {r: 16, alpha: 32, target_modules: all-linear} (defaults: r 16, alpha 32, dropout 0, "
              "all linear layers but the head; model.disable_dropout turns LoRA dropout off too). The "
              "reference is then the same model with its adapters disabled. None: full fine-tuning.")
    train_vision: bool = option(
        False, "Vision-language models: train the vision tower and projector too (with model.lora: "
               "the targets apply to them as well, so all-linear adapts their linear layers; their base "
               "weights stay frozen). False: they stay frozen and LoRA targets (all-linear or a list of "
               "names; a regex string is taken as written) apply to the language model only.")
    load_in_4bit: bool = option(
        False, "QLoRA: load the base in 4-bit NF4 (bitsandbytes, bfloat16 compute; CUDA only) and train "
               "LoRA adapters on it (needs model.lora).")
    lm_head: str = option(
        "auto", "Where the LM head runs: 'fused' applies it to the scored (completion) positions only, in "
                "chunks (model.lm_head_chunk_size) recomputed in backward; 'scored' passes those positions "
                "to the model's own forward (logits_to_keep); 'full' computes logits everywhere. 'auto' "
                "takes the first of fused, scored, full that reproduces the full log-probs on a probe batch.",
        choices=("auto", "fused", "scored", "full"))
    lm_head_chunk_size: int | None = option(
        None, "Scored tokens per LM-head chunk with the fused head; None: as many as keep one chunk's "
              "float32 logits under 256 MiB (one chunk, no recomputation, when they all fit).")
    disable_dropout: bool = option(True, "Turn dropout off in the policy and the reference, so both "
                                         "score alike (DPO's loss is log 2 at step 0) and log-ratios "
                                         "carry no sampling noise.")


@dataclass
class DataConfig:
    train: str | None = option(None, "Training data: a file (.json, .jsonl, .jsonl.gz, .parquet, "
                               ".csv), a datasets.save_to_disk folder, or a hub dataset id.")
    eval: str | None = option(None, "Evaluation data, same forms as `train`.")
    eval_split_size: float = option(
        0, "Hold out this many training examples (or this fraction when < 1) as evaluation "
           "data when `eval` is not given. The split is seeded by train.seed.")
    split: str = option("train", "Split to read from a hub dataset or a DatasetDict folder.")
    format: str = option("auto", "Record format; 'auto' takes the format of most of the first 100 "
                         "records (others are bad records). `prefopt formats` lists them.")
    columns: dict = option(
        factory=dict, help="Rename source columns to canonical ones before the format is "
                           "detected, e.g. {prompt: question, chosen: good, rejected: bad}.")
    max_examples: int | None = option(None, "Use only the first N records (after reading, before "
                                      "the eval split); the count is reported.")
    max_length: int = option(1024, "Maximum tokens of prompt + completion. An example that does not "
                             "fit is cut to fit (see `truncation`); every cut is counted.")
    max_prompt_length: int | None = option(
        None, "Maximum prompt tokens; longer prompts are always cut to it (see prompt_truncation) and "
              "counted. None: with truncation=auto, a prompt is cut only when the example does not fit in "
              "max_length, and never below max_length // 2; with truncation=strict, never.")
    prompt_truncation: str = option("keep_end", "Which end of a long prompt to keep: keep_end keeps the most "
                                    "recent tokens (the last turns and the generation prompt; a leading BOS "
                                    "is kept too), keep_start the beginning.",
                                    choices=("keep_end", "keep_start"))
    truncation: str = option(
        "auto", "What happens to an example longer than max_length. 'auto': its prompt is cut (see "
                "prompt_truncation) until the longest completion fits, but keeps at least max_length // 2 "
                "tokens; the completions are then cut to the room left; a pair whose chosen and rejected "
                "become identical is dropped. Every cut and drop is counted. 'strict': a prompt is cut only "
                "to max_prompt_length, a prompt that leaves no room for a completion is a bad record "
                "(data.on_error), and a pair made identical by cutting its completions is kept and counted.",
        choices=("auto", "strict"))
    on_error: str = option(
        "raise", "Bad records: 'raise' stops with file, line and problem; 'skip' skips them, "
                 "counts them and writes them to OUTPUT_DIR/rejected_records.jsonl.",
        choices=("raise", "skip"))
    layout: str = option(
        "auto", "How a micro-batch is laid out: 'padded' (one sequence per row), 'packed' (several "
                "sequences per row, no padding between them), 'shared' (packed, each prompt encoded once "
                "with its completions branching from it). 'auto' takes the first of shared, packed, "
                "padded that the model's attention implementation runs exactly (checked on a probe batch).",
        choices=("auto", "padded", "packed", "shared"))
    max_tokens_per_row: int | None = option(
        None, "Row budget of the packed and shared layouts; None: the longest unit of the micro-batch "
              "(rows never grow longer than that unit alone, shorter units fill the room padding took).")
    max_tokens_per_batch: int | None = option(
        None, "Form training micro-batches by tokens instead of train.per_device_train_batch_size: whole "
              "examples are added while their tokens, counted as the shared layout reads them (the prompt "
              "once plus each completion scored), stay within this budget. Losses are normalised over the "
              "whole optimizer step, so uneven micro-batches weigh nothing differently. Epochs are counted "
              "in the first epoch's micro-batches (later epochs' orders cut slightly differently).")
    group_by_length: bool = option(
        False, "Sort each window of ~50 micro-batches of the shuffled order by length, so a micro-batch "
               "holds examples of similar lengths: less padding, fuller packed rows (the logged "
               "batch_fill); the windows stay in random order.")
    pad_to_multiple_of: int | None = option(None, "Pad batch length up to a multiple of this.")
    num_proc: int = option(1, "Processes that tokenise (TRL's dataset_num_proc); the examples, their order and "
                              "the data report are the same for any number.")
    streaming: bool = option(
        False, "Training data larger than memory: read, converted and tokenised as training consumes it "
               "(JSON Lines and Parquet are read lazily), each process its share of the records, shuffled "
               "through a buffer of shuffle_buffer examples; needs train.max_steps. Not cached.")
    shuffle_buffer: int = option(10000, "data.streaming: examples held to shuffle the stream (the order of "
                                        "each pass is a function of train.seed and the pass).")
    cache: bool = option(True, "Keep the tokenised examples in a cache keyed on the data's content, the tokenizer and "
                               "every data setting: a second run reads them back instead of tokenising, and under "
                               "several processes only the main one tokenises.")
    cache_dir: str | None = option(None, "Where the tokenised-data cache lives; None: $PREFOPT_CACHE/data or "
                                         "~/.cache/prefopt/data.")


@dataclass
class TrainConfig:
    learning_rate: float = option(1e-6, "Peak learning rate of AdamW.")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    lr_scheduler_type: str = option(
        "linear", "Schedule after warmup (transformers.get_scheduler names).",
        choices=("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
                 "polynomial", "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay"))
    lr_scheduler_kwargs: dict = option(factory=dict, help="Extra arguments of the schedule (transformers' "
                                       "scheduler_specific_kwargs), e.g. {min_lr_rate: 0.1} for cosine_with_min_lr.")
    warmup_ratio: float = option(0.0, "Warmup as a fraction of total optimizer steps.")
    warmup_steps: int = option(0, "Warmup steps; overrides warmup_ratio when > 0.")
    max_grad_norm: float | None = option(1.0, "Clip the global gradient norm; None disables.")
    per_device_train_batch_size: int = option(4, "Examples (pairs) per micro-batch per process.")
    per_device_eval_batch_size: int = option(8, "Examples per evaluation batch per process.")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    num_train_epochs: float = option(1, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = option(-1, "Total optimizer steps; > 0 overrides num_train_epochs.")
    mixed_precision: str = option(
        "auto", "Autocast precision for forward passes (accelerate). 'auto': bf16 on a CUDA GPU that "
                "supports it, else full float32: on CPU, bf16 autocast was slower than float32 in every "
                "measurement (README, 'Precision').", choices=("auto", "no", "bf16", "fp16"))
    seed: int = option(42, "Seed for initialisation, shuffling and dropout.")
    logging_steps: int = option(10, "Log training metrics every N optimizer steps.")
    logging_first_step: bool = option(False, "Also log the first step.")
    eval_strategy: str = option("steps", "When to evaluate during training (with eval data): 'steps' every "
                                "eval_steps steps, 'epoch' at each epoch's end; with either, once more at the end "
                                "unless the last step just did. 'no': never.", choices=("steps", "epoch", "no"))
    eval_steps: int = option(0, "Evaluate every N steps; 0: only at the end (when eval data exists).")
    eval_on_start: bool = option(False, "Evaluate once before the first step.")
    save_strategy: str = option("steps", "When to save a resumable checkpoint: 'steps' every save_steps steps, "
                                "'epoch' at each epoch's end, 'no' never (final/ is written in every case).",
                                choices=("steps", "epoch", "no"))
    save_steps: int = option(0, "Save a resumable checkpoint every N steps; 0: only the final model.")
    save_total_limit: int | None = option(None, "Keep only the newest N checkpoints.")
    resume_from: str | None = option(None, "A checkpoint directory, or 'latest' for the newest sound one in "
                                     "OUTPUT_DIR/checkpoints (a damaged checkpoint is named and skipped).")
    overwrite_output_dir: bool = option(False, "Start afresh in an output_dir that holds another run's "
                                               "checkpoints or final model (deleting them); without it the "
                                               "run refuses, unless it resumes (train.resume_from).")
    max_consecutive_skips: int = option(
        5, "A step whose loss or gradient is not finite is skipped (no update) and counted (skipped_steps); "
           "this many in a row stop the run with a checkpoint and a message.")
    progress_bar: bool = option(True, "Show a progress bar on the main process.")
    report_to: list = option(factory=list, help="Experiment trackers through accelerate (TRL's name): any of "
                                                "tensorboard, wandb, trackio, mlflow, comet_ml; a name or a list; "
                                                "'none' for none. Logs go under OUTPUT_DIR/logs; metrics.jsonl "
                                                "is always written. With no network: W&B logs offline when no API "
                                                "key is known, MLflow to a store under logs/.")
    run_name: str | None = option(None, "Name of the run in the trackers; None: the output_dir's name.")
    report_html: bool = option(True, "End the run by writing OUTPUT_DIR/report.html (plots, metrics, data "
                                     "report, samples); `prefopt report OUTPUT_DIR` rewrites it.")


@dataclass
class ReferenceConfig:
    strategy: str = option(
        "auto", "'model': a frozen reference model run alongside the policy; 'lora': the policy with its "
                "LoRA adapters disabled (no second copy); 'precomputed': reference log-probs computed once "
                "in a pre-pass (with the model or the LoRA base) and cached on disk, the model then freed; "
                "'none': no reference; 'auto': 'lora' for a LoRA policy, else 'model', when a loss needs "
                "a reference, else 'none'.", choices=("auto", "model", "lora", "precomputed", "none"))
    name_or_path: str | None = option(
        None, "Reference model hub id or directory. None: a frozen copy of the initial policy.")
    dtype: str | None = option(None, "dtype of the reference weights; None: same as model.dtype.",
                               choices=(None, "float32", "bfloat16", "float16", "auto"))
    sync_steps: int = option(
        0, "TR-DPO: every N optimizer steps move the reference toward the policy (ref <- alpha*policy + "
           "(1-alpha)*ref); 0: a fixed reference. Needs a separate reference model (strategy model).")
    sync_alpha: float = option(1.0, "TR-DPO's alpha: 1 copies the policy (hard update), < 1 mixes (soft update).")
    cache_dir: str | None = option(
        None, "Where the precomputed reference log-probs are cached (a folder per key: reference weights, "
              "data, tokenisation, layout, precision); None: OUTPUT_DIR/reference_cache.")


@dataclass
class SaveConfig:
    merge_lora: bool = option(
        False, "With LoRA, save the final model with the adapters merged into the base weights (loads with "
               "AutoModelForCausalLM); false saves the adapter (loads with PeftModel.from_pretrained).")
    push_to_hub: bool = option(False, "At the end of training, upload final/ (with its model card) to the Hugging "
                                      "Face Hub repository save.hub_model_id (the token: HF_TOKEN or `hf auth login`).")
    hub_model_id: str | None = option(None, "The Hub repository ('org/name'); None: the output_dir's name under "
                                            "your account.")
    hub_private_repo: bool | None = option(None, "Create the repository private; None: the Hub's default.")
    hub_revision: str | None = option(None, "The branch pushed to; None: main.")


@dataclass
class GenerateConfig:
    prompts: str | None = option(
        None, "Prompts to sample from: a file or dataset in any data format (the prompt of each record; "
              "{prompt: ...} alone works too). None: data.train.")
    output: str | None = option(None, "JSONL file the samples are written to; None: OUTPUT_DIR/generations.jsonl.")
    num_samples: int = option(1, "Completions sampled per prompt (n).")
    max_new_tokens: int = option(128, "Most tokens generated per completion. A prompt longer than "
                                      "data.max_length - max_new_tokens is a bad record (data.on_error).")
    temperature: float = option(1.0, "Sampling temperature; 0 decodes greedily (top_p/top_k unused; the n samples of a "
                                            "prompt are then one decode, repeated).")
    top_p: float = option(1.0, "Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.")
    top_k: int = option(0, "Keep only the k most likely tokens; 0: no limit.")
    stop: list = option(factory=list, help="Stop strings: a completion ends before the first one (EOS always stops).")
    seed: int | None = option(None, "Seed of the sampling; None: train.seed. Same seed, settings and batch "
                                    "size give the same samples.")
    batch_size: int = option(16, "Prompts per generation batch (left-padded, KV cache).")
    backend: str = option("transformers", "Sampling engine: transformers' generate (KV cache; CPU and GPU) or "
                                          "vllm (GPU, needs the vllm package; the model is loaded from "
                                          "model.name_or_path).", choices=("transformers", "vllm"))


@dataclass
class EvalConfig:
    generate: bool = option(False, "prefopt eval also samples: the judge's mean reward, the win rate against the "
                                   "reference's samples, the sampled KL to the reference, the reference's best-of-N.")
    judge: Any = option("length", "The judge of sampled completions (see iterative.judge for the forms).")
    best_of_n: int = option(0, "Also report the reference's best-of-N reward with N samples per prompt; 0: off.")
    max_prompts: int | None = option(None, "Sample for the first N prompts only.")
    sweep: list = option(factory=list, help="Evaluate several models (checkpoints, runs at several beta) against "
                                            "the same reference samples; writes OUTPUT_DIR/reward_kl.csv/.md.")


@dataclass
class SpinConfig:
    iterations: int = option(2, "Rounds of SPIN: sample from the current model, pair the data's response "
                                "(chosen) with the sample (rejected), train against the round's start.")


@dataclass
class IterativeConfig:
    iterations: int = option(2, "Rounds of sample -> judge -> pair -> train.")
    judge: Any = option("length", "The judge that scores samples: a name (vader, regex, length, python, self, "
                                  "reward_model) or a mapping {name: ..., options}; 'self' is the policy "
                                  "(Self-Rewarding LMs).")
    pairs: str = option("best_worst", "Which pairs a prompt's samples make: the best against the worst, or "
                                      "every two samples.", choices=("best_worst", "all"))
    min_gap: float = option(0.0, "Keep a pair only when the judge's scores differ by more than this.")
    reference: str = option("previous", "Reference of round t: the round's starting model (previous) or the "
                                        "first model (initial).", choices=("previous", "initial"))


@dataclass
class StepwiseConfig:
    chunks: int = option(2, "sDPO: cut data.train into this many contiguous chunks, trained in order.")
    sources: list = option(factory=list, help="sDPO: one data source per step, in order (overrides chunks).")


@dataclass
class LossTerm:
    """One loss of the objective. YAML: ``{name: dpo, weight: 1.0, beta: 0.1, ...}``."""
    name: str = option("dpo", "Registry key of the loss (`prefopt losses` lists them).")
    weight: float = option(1.0, "Weight of this loss in the objective.")
    params: dict = option(factory=dict, help="Parameters of the loss (beta, label_smoothing, ...).")
    modifiers: dict = option(
        factory=dict, help="Modifiers of this term by key (ld_alpha, wpo; `prefopt losses` lists them). "
                           "Written in YAML beside the loss parameters: {name: ipo, ld_alpha: 0.5}.")

    def resolved_params(self):
        """The loss's parameter dataclass, defaults filled in and values checked."""
        return get_spec(self.name).make_params(self.params, where=f"loss '{self.name}'")


@dataclass
class RunConfig:
    output_dir: str = option("runs/prefopt", "Where metrics.jsonl, config.yaml, checkpoints/ and "
                             "final/ are written.")
    model: ModelConfig = option(factory=ModelConfig, help="The policy model.")
    data: DataConfig = option(factory=DataConfig, help="Datasets and tokenisation.")
    train: TrainConfig = option(factory=TrainConfig, help="Optimisation and bookkeeping.")
    reference: ReferenceConfig = option(factory=ReferenceConfig, help="The reference model.")
    save: SaveConfig = option(factory=SaveConfig, help="How the final model is written.")
    generate: GenerateConfig = option(factory=GenerateConfig, help="Sampling from the policy (prefopt generate, "
                                                                   "and the methods that sample).")
    eval: EvalConfig = option(factory=EvalConfig, help="What prefopt eval measures beyond preference metrics.")
    spin: SpinConfig = option(factory=SpinConfig, help="SPIN (prefopt spin).")
    iterative: IterativeConfig = option(factory=IterativeConfig, help="Iterative / self-rewarding DPO "
                                                                      "(prefopt iterative).")
    stepwise: StepwiseConfig = option(factory=StepwiseConfig, help="sDPO (prefopt stepwise).")
    loss: list = option(factory=lambda: parse_loss("dpo"),
                        help="The objective: one loss or a weighted list of losses.")

    def __getattr__(self, name: str):
        """Flat names read back (``args.learning_rate`` is ``args.train.learning_rate``,
        ``args.beta`` the single loss's beta, ``args.loss_type`` its name), and TRL's field names
        (prefopt.configs.trl_readback), as they go in."""
        if name.startswith("_"):
            raise AttributeError(name)
        from prefopt.config_flat import flat_target

        path = flat_target(name)
        loss = self.__dict__.get("loss") or []
        if path == "loss.name":
            return loss[0].name if len(loss) == 1 else [t.name for t in loss]
        if path is not None:
            section, key = path.split(".")
            return getattr(getattr(self, section), key)
        if len(loss) == 1:
            params = dataclasses.asdict(loss[0].resolved_params())
            if name in params:
                return params[name]
        from prefopt.configs import trl_readback

        found = trl_readback(self, name)  # TRL's field names (args.bf16, args.eval_strategy...)
        if found is not None:
            return found[0]
        raise AttributeError(f"'{type(self).__name__}' has no attribute '{name}' (nor a flat name of that "
                             f"name; `prefopt keys` lists them)")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
            "reference": ReferenceConfig, "save": SaveConfig, "generate": GenerateConfig, "eval": EvalConfig,
            "spin": SpinConfig,
            "iterative": IterativeConfig, "stepwise": StepwiseConfig}

# ----------------------------------------------------------------------------- parsing

def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}", prefix.rstrip(".") or None)
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in by_name:
            raise ConfigError(f"unknown config key '{path}'{did_you_mean(path, [f'{prefix}{n}' for n in by_name])}; "
                              f"`prefopt keys` lists them all", path)
        f = by_name[key]
        if key == "loss" and cls is RunConfig:
            kwargs[key] = parse_loss(value)  # its errors carry the key of the loss term at fault
        elif is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value or {}, f"{path}.")
        else:
            kwargs[key] = coerce(value, hints[key], path)
            choices = f.metadata.get("choices")
            if choices and kwargs[key] not in choices:
                raise ConfigError(f"{path}: '{kwargs[key]}' is not one of {list(choices)}"
                                  f"{did_you_mean(kwargs[key], [c for c in choices if c])}", path)
    return cls(**kwargs)


def parse_loss(value: Any) -> list[LossTerm]:
    """`loss` may be a name, a mapping with `name` and parameters, or a list of those."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError("loss: the objective needs at least one loss", "loss")
    terms = []
    for i, item in enumerate(items):
        where = f"loss[{i}]" if isinstance(value, list) else "loss"
        try:
            terms.append(_parse_term(item, where))
        except ConfigError as e:
            if not (e.key or "").startswith(where):
                e.key = where  # the term at fault (a message about a parameter names it)
            raise
    return terms


def _parse_term(item: Any, where: str) -> LossTerm:
    if isinstance(item, LossTerm):
        item = to_dict(item)
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict) or "name" not in item:
        raise ConfigError(f"{where}: expected a loss name or a mapping with 'name', got {item!r}")
    item = dict(item)
    name = str(item.pop("name"))
    weight = coerce(item.pop("weight", 1.0), float, f"{where}.weight")
    modifiers = {key: spec.parse(item.pop(key), where) for key, spec in MODIFIERS.items() if key in item}
    modifiers = {key: value for key, value in modifiers.items() if MODIFIERS[key].active(value)}
    params = dict(item.pop("params", {}) or {})
    params.update(item)
    try:
        spec = get_spec(name)
    except KeyError as e:
        raise ConfigError(f"{where}.name: {e.args[0]}") from None
    if modifiers and spec.data != "paired":
        raise ConfigError(f"{where}: {', '.join(modifiers)} apply to paired losses; '{spec.name}' is "
                          f"{spec.data}")
    term = LossTerm(name=spec.name, weight=weight, params=params, modifiers=modifiers)
    term.params = dataclasses.asdict(term.resolved_params())  # validate now, store resolved
    return term


def config_from_dict(data: dict | None, cls=RunConfig) -> RunConfig:
    return _build(cls, dict(data or {}), "")


def to_dict(cfg: Any) -> Any:
    """Plain data for YAML: loss terms are written flat ({name, weight, **params})."""
    if isinstance(cfg, LossTerm):
        return {"name": cfg.name, "weight": cfg.weight, **cfg.params, **cfg.modifiers}
    if is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- overrides

def apply_override(data: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict in place. Values are parsed as YAML.

    For the loss list, ``loss.beta=0.2`` addresses the only loss and ``loss.1.beta=0.2``
    the second one.
    """
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}': expected key=value (e.g. train.learning_rate=1e-5)")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    parts = key.strip().split(".")
    if parts[0] == "loss":
        _override_loss(data, parts[1:], value, key)
        return
    set_dotted(data, parts, value, key)


def set_dotted(data: dict, parts: list[str], value: Any, key: str) -> None:
    """``data[a][b][c] = value`` for the key parts (a, b, c); an unset mapping (model.lora: null)
    takes its first key."""
    node = data
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def _override_loss(data: dict, parts: list[str], value: Any, key: str) -> None:
    if not parts:
        data["loss"] = value
        return
    current = data.get("loss", "dpo")
    terms = [t if isinstance(t, dict) else {"name": t} for t in
             (current if isinstance(current, list) else [current])]
    terms = [to_dict(t) if isinstance(t, LossTerm) else dict(t) for t in terms]
    if parts[0].isdigit():
        index, parts = int(parts[0]), parts[1:]
        if index >= len(terms):
            raise ConfigError(f"override '{key}': the objective has {len(terms)} loss(es)")
    elif len(terms) == 1:
        index = 0
    else:
        raise ConfigError(f"override '{key}': the objective has {len(terms)} losses; "
                          f"address one as loss.<index>.{'.'.join(parts)}")
    if len(parts) != 1:
        raise ConfigError(f"override '{key}': expected loss[.index].param=value")
    terms[index][parts[0]] = value
    data["loss"] = terms if isinstance(current, list) else terms[0]


def read_yaml(path: Path) -> dict:
    """A YAML config as a dict; ``base: other.yaml`` (relative to this file) is read first and
    this file's keys are merged over it (mappings merge key by key; lists and values replace)."""
    return read_yaml_located(path)[0]


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                defaults: dict | None = None) -> RunConfig:
    """Read a YAML config (and its ``base`` chain), apply overrides, validate everything.

    An override is ``dotted.key=value`` or a flat TRL-style name (``learning_rate=1e-5``, a
    parameter of the single loss such as ``beta=0.2``), routed by
    prefopt.config_flat.route_flat_override. An error names the file and line, or the
    override, that set the key at fault."""
    from prefopt.config_flat import route_flat_override

    data: dict = dict(defaults or {})
    lines: dict = {}
    if path is not None:
        loaded, lines = read_yaml_located(Path(path))
        data = deep_merge(data, loaded)  # a file's train: section keeps the verb's other defaults
    given: dict[str, str] = {}  # dotted key -> the override that set it
    for assignment in overrides:
        for routed in route_flat_override(assignment, data):
            check_override_key(routed, assignment)  # a typo in an override is the override's, not the file's
            apply_override(data, routed)
            given[routed.split("=", 1)[0].strip()] = assignment
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise blame(e, path, lines, given) from None


def check_override_key(assignment: str, given: str | None = None) -> None:
    """An unknown dotted key in a command-line override (``given``, as typed, before a flat name
    was routed): named as the override, with the closest valid key."""
    key = assignment.split("=", 1)[0].strip()
    parts = key.split(".")
    if "=" not in assignment or parts[0] in ("loss", "output_dir", "base"):
        return
    section = SECTIONS.get(parts[0])
    if section is not None and len(parts) >= 2:
        field_types = {f.name: f.type for f in fields(section)}
        if parts[1] in field_types and (len(parts) == 2 or "dict" in str(field_types[parts[1]])):
            return
    valid = [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in fields(cls)] + ["output_dir", "loss"]
    raise ConfigError(f"override '{given or assignment}': unknown config key '{key}'{did_you_mean(key, valid)}; "
                      f"`prefopt keys` lists them all")


def describe_keys() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every config key: the source of `prefopt keys`."""
    rows = [("output_dir", "str", RunConfig().output_dir, fields(RunConfig)[0].metadata["help"])]
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tp = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
            choices = f.metadata.get("choices")
            help_text = f.metadata["help"] + (f" One of: {', '.join(map(str, choices))}." if choices else "")
            rows.append((f"{section}.{f.name}", tp, default, help_text))
    rows.append(("loss", "name | {name, weight, **params} | list", "dpo",
                 fields(RunConfig)[-1].metadata["help"] + " `prefopt losses` lists names and parameters."))
    return rows
