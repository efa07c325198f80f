"""final/README.md: the model card, in the Hugging Face convention (YAML front matter, then prose).

Front matter: ``library_name`` (transformers; peft for a LoRA adapter), ``base_model`` (a hub
id only: the Hub refuses other values; a local directory is named in the text), ``tags``
(prefopt and the loss names), ``datasets`` (hub ids among data.train/data.eval),
``pipeline_tag``. Then: the base model, the data (with the counts of OUTPUT_DIR/data_report.json),
the objective (losses, weights, parameters), the training settings, the final metrics (the last
train and eval rows of OUTPUT_DIR/metrics.jsonl), the prefopt version and the command that
trains it again. Written by the main process only (save_final).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from prefopt.config import RunConfig
from prefopt.losses import get_spec
from prefopt.train.metrics import last_rows

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# the train-row metrics shown first in the card, when a run has them
HEADLINE = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
            "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "epoch", "num_tokens")


def is_hub_id(name: str | None) -> bool:
    """``org/name`` that is not a local path (a file or folder of that name here is local)."""
    return bool(name) and HUB_ID.match(str(name)) is not None and not Path(str(name)).exists() \
        and not str(name).endswith((".json", ".jsonl", ".gz", ".parquet", ".csv"))


def verb(config: RunConfig) -> str:
    """The CLI verb that trains this config: rm for a reward model, sft for SFT alone, else dpo."""
    specs = [get_spec(t.name) for t in config.loss]
    if any(s.scores == "reward" for s in specs):
        return "rm"
    return "sft" if all(s.name == "sft" for s in specs) else "dpo"


def model_card(config: RunConfig, output_dir: Path, path: Path, *, adapter: bool, num_processes: int = 1) -> str:
    from huggingface_hub import ModelCardData

    from prefopt import __version__

    model = config.model.name_or_path
    sources = [s for s in (config.data.train, config.data.eval) if s]
    reward_model = verb(config) == "rm"
    meta = ModelCardData(
        library_name="peft" if adapter else "transformers",
        base_model=model if is_hub_id(model) else None,
        datasets=[s for s in sources if is_hub_id(s)] or None,
        tags=["prefopt", *dict.fromkeys(t.name for t in config.loss), *(["lora"] if config.model.lora else [])],
        pipeline_tag="text-classification" if reward_model else "text-generation")
    lines = [f"---\n{meta.to_yaml()}\n---", "", f"# {Path(output_dir).resolve().name or 'prefopt model'}", "",
             f"Trained with prefopt {__version__} "
             f"({' + '.join(t.name for t in config.loss)}). "
             + ("A reward model. " if reward_model else "")
             + ("A LoRA adapter: loads with PeftModel.from_pretrained over the base model's "
                if adapter else "Loads with ")
             + ("AutoModelForSequenceClassification." if reward_model else "AutoModelForCausalLM.")
             + ("" if adapter else "from_pretrained."),
             "", "## Base model", "",
             (f"[{model}](https://huggingface.co/{model})" if is_hub_id(model) else
              f"`{model}` (a local directory)" if model else "a model object passed to the trainer")
             + (f", with LoRA adapters ({_inline(config.model.lora)})" if config.model.lora else "") + "."]
    lines += ["", "## Data", ""] + _data(config, output_dir)
    lines += ["", "## Objective", "", "| loss | weight | parameters |", "|---|---|---|"]
    for term in config.loss:
        params = {**term.params, **term.modifiers}
        lines.append(f"| {term.name} | {term.weight:g} | {_inline(params) or '-'} |")
    ref = config.reference
    lines += ["", f"Reference: {ref.name_or_path or 'a frozen copy of the base model'} (strategy {ref.strategy})."]
    lines += ["", "## Training settings", ""] + _settings(config, num_processes)
    lines += ["", "## Final metrics", ""] + _metrics(output_dir)
    lines += ["", "## Reproduce", ""] + _reproduce(config, output_dir, path)
    return "\n".join(lines) + "\n"


def _inline(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _data(config: RunConfig, output_dir: Path) -> list[str]:
    data = config.data
    report_file = Path(output_dir) / "data_report.json"
    reports = {r["dataset"]: r for r in json.loads(report_file.read_text())} if report_file.is_file() else {}
    out = []
    for name, source in (("train", data.train), ("eval", data.eval)):
        if source and is_hub_id(source):
            where = f"[{source}](https://huggingface.co/datasets/{source}) (split {data.split})"
        elif source:
            where = f"`{source}`"
        elif name == "eval" and data.eval_split_size and "eval" in reports:
            where = f"{data.eval_split_size:g} of the training data held out"
        elif name in reports or name == "train":
            where = f"a dataset passed to the trainer ({name}_dataset)"
        else:
            continue
        report = reports.get(name)
        if report:
            rejected = sum((report.get("rejected") or {}).values())
            where += (f": {report['examples']} examples used of {report['records']} records (format "
                      f"{report.get('format')}" + (f", {rejected} rejected" if rejected else "") + ")")
        out.append(f"- {name}: {where}")
    out.append(f"- max_length {data.max_length}, max_prompt_length {data.max_prompt_length}")
    return out


def _settings(config: RunConfig, num_processes: int) -> list[str]:
    t = config.train
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * num_processes
    length = f"{t.max_steps} optimizer steps" if t.max_steps > 0 else f"{t.num_train_epochs:g} epochs"
    return [f"- {length}; learning rate {t.learning_rate:g} ({t.lr_scheduler_type}, warmup "
            + (f"{t.warmup_steps} steps" if t.warmup_steps else f"ratio {t.warmup_ratio:g}") + f"), weight decay "
            f"{t.weight_decay:g}, max grad norm {t.max_grad_norm}",
            f"- batch: {t.per_device_train_batch_size} per device x {t.gradient_accumulation_steps} accumulation x "
            f"{num_processes} process(es) = {per_step} examples per optimizer step"
            + (f" (micro-batches of up to {config.data.max_tokens_per_batch} tokens)"
               if config.data.max_tokens_per_batch else ""),
            f"- precision: weights {config.model.dtype}, mixed precision {t.mixed_precision}; seed {t.seed}"]


def _metrics(output_dir: Path) -> list[str]:
    train, evaluation = last_rows(Path(output_dir) / "metrics.jsonl")
    if not train and not evaluation:
        return ["No metrics.jsonl beside this model."]
    out = []
    for title, row in (("train", train), ("eval", evaluation)):
        if not row:
            continue
        keys = [k for k in HEADLINE if k in row] if title == "train" else [k for k in row if k.startswith("eval/")]
        out += [f"Last {title} row (step {row.get('step')}):", "", "| metric | value |", "|---|---|"]
        out += [f"| {k} | {_number(row[k])} |" for k in keys] + [""]
    return out[:-1]


def _number(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _reproduce(config: RunConfig, output_dir: Path, path: Path) -> list[str]:
    from prefopt import __version__

    saved = Path(output_dir) / "config.yaml"
    if not saved.is_file():  # a model saved without train()
        saved = Path(path) / "prefopt_config.yaml"
    extra = " train.resume_from=null" if config.train.resume_from else ""
    if not config.data.train:
        extra += " data.train=YOUR_DATA"
    return [f"The resolved configuration (every default filled in) is saved beside this model as "
            f"`prefopt_config.yaml`. With prefopt {__version__}, this trains it again (a run of the Python API "
            f"as well):", "", "```",
            f"prefopt {verb(config)} {saved} output_dir={Path(output_dir)}-again{extra}", "```"]


def write_model_card(config: RunConfig, output_dir: Path, path: Path, *, adapter: bool,
                     num_processes: int = 1) -> Path:
    card = Path(path) / "README.md"
    card.write_text(model_card(config, output_dir, path, adapter=adapter, num_processes=num_processes))
    return card
