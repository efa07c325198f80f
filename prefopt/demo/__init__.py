"""`prefopt demo`: the whole pipeline on built-in data, offline, in a few minutes on a CPU.

1. train a byte-level BPE tokenizer on the demo data and build a tiny random Llama;
2. SFT on the chosen responses (prefopt/demo/sft.yaml);
3. DPO against the SFT model as frozen reference (prefopt/demo/dpo.yaml);
4. evaluate the SFT model (before) and the DPO model (after) against the SFT reference,
   on the training pairs and on held-out pairs, and print the table.

Data: dpo_en_demo.json from LLaMA-Factory (Apache-2.0, see data/NOTICE).
Outputs: OUTPUT_DIR/base, OUTPUT_DIR/sft, OUTPUT_DIR/dpo, OUTPUT_DIR/summary.json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_DIR = Path(__file__).parent
DATA = DEMO_DIR / "data" / "dpo_en_demo.json"
TABLE_METRICS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                 "logps/chosen", "logps/rejected", "loss")
# The tiny model: a real Llama architecture, small enough for 2 CPU cores.
TOKENIZER_VOCAB = 2048
MODEL_SHAPE = dict(arch="llama", hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate_size=256,
                   max_positions=512)


def build_base(path: Path, seed: int = 0) -> Path:
    from prefopt.models import build_tiny_model, save_pretrained, train_tokenizer

    records = json.loads(DATA.read_text())
    texts = [turn["value"] for r in records for turn in r["conversations"] + [r["chosen"], r["rejected"]]]
    tokenizer = train_tokenizer(texts, vocab_size=TOKENIZER_VOCAB)
    model = build_tiny_model(len(tokenizer), seed=seed, **MODEL_SHAPE)
    return save_pretrained(model, tokenizer, path)


def run_demo(output_dir: str | Path = "runs/demo", quick: bool = False) -> bool:
    """Run the demo; returns True when DPO moved the model as expected on the training pairs."""
    from prefopt.config import load_config
    from prefopt.trainer import Trainer

    out = Path(output_dir)
    started = time.perf_counter()
    # The demo is one fresh job: a rerun replaces the previous demo's outputs.
    quick_overrides = ["train.overwrite_output_dir=true"] + (
        ["train.max_steps=3", "train.logging_steps=1", "data.max_examples=40", "data.eval_split_size=8"] if quick else [])
    _say(f"1/4 tokenizer + tiny Llama -> {out / 'base'}")
    base = build_base(out / "base")

    _say("2/4 SFT on the chosen responses")
    sft_cfg = load_config(DEMO_DIR / "sft.yaml", [f"model.name_or_path={base}", f"data.train={DATA}",
                                                  f"output_dir={out / 'sft'}", *quick_overrides])
    Trainer.from_config(sft_cfg).train()
    sft_model = out / "sft" / "final"

    _say("3/4 DPO against the SFT model as reference")
    dpo_overrides = [f"model.name_or_path={sft_model}", f"data.train={DATA}", *quick_overrides]
    dpo_cfg = load_config(DEMO_DIR / "dpo.yaml", dpo_overrides + [f"output_dir={out / 'dpo'}"])
    Trainer.from_config(dpo_cfg).train()
    dpo_model = out / "dpo" / "final"

    _say("4/4 evaluation against the SFT reference: training pairs and held-out pairs")
    results = {}
    for label, model in (("before (SFT)", sft_model), ("after (DPO)", dpo_model)):
        cfg = load_config(DEMO_DIR / "dpo.yaml", dpo_overrides + [
            f"model.name_or_path={model}", f"reference.name_or_path={sft_model}",
            f"output_dir={out / 'eval'}"])
        trainer = Trainer.from_config(cfg)
        results[label] = {"train": trainer.evaluate(on="train", metric_key_prefix="eval/"),
                          "held-out": trainer.evaluate(on="eval", metric_key_prefix="eval/")}
    after = results["after (DPO)"]["train"]
    ok = after["eval/rewards/accuracies"] >= 0.9 and after["eval/rewards/margins"] > 0
    seconds = time.perf_counter() - started
    _print_table(results, seconds, ok, out)
    (out / "summary.json").write_text(json.dumps({"seconds": seconds, "dpo_moved_model": ok,
                                                  "results": results}, indent=2))
    return ok or quick


def _say(text: str) -> None:
    print(f"\n== prefopt demo: {text}", flush=True)


def _print_table(results: dict, seconds: float, ok: bool, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="DPO before/after (rewards are β·log πθ/πref against the SFT model)")
    table.add_column("metric")
    for split in ("train", "held-out"):
        for label in results:
            table.add_column(f"{split}\n{label}", justify="right")
    for metric in TABLE_METRICS:
        row = [metric]
        for split in ("train", "held-out"):
            for label in results:
                row.append(f"{results[label][split]['eval/' + metric]:.4f}")
        table.add_row(*row)
    console = Console()
    console.print(table)
    verdict = ("DPO moved the model: training-pair reward accuracy >= 0.9 with a positive margin"
               if ok else "DPO did NOT reach reward accuracy >= 0.9 with a positive margin on the training pairs")
    console.print(f"{verdict}. Total {seconds:.0f} s. Outputs: {out}/{{base,sft,dpo}}, {out}/summary.json")
