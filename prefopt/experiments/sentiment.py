"""The DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, §6.1, Figure 2 left),
on built-in data and a CPU.

    prefopt experiment sentiment [--output-dir runs/sentiment] [--quick]

The paper: x is the opening of an IMDb review, the policy must continue it with positive
sentiment, the reward is a sentiment classifier's score; DPO is compared with PPO and
best-of-N at several KL budgets. Here, offline and small:

1. **Data.** Sentences of the built-in demo texts (LLaMA-Factory's dpo_en_demo.json), each
   cut into an opening x (its first ``OPENING_WORDS`` words) and the rest y.
2. **SFT.** A byte-level BPE tokenizer and a tiny random Llama trained with SFT on (x, y).
3. **Pairs.** For each training opening the SFT model samples ``PAIR_SAMPLES`` continuations;
   the reward r(x, y) is the VADER compound sentiment of y (Hutto & Gilbert 2014), in [−1, 1];
   the best against the worst sample makes a pair when their rewards differ by > ``MIN_GAP``.
4. **Training.** DPO at several β, IPO and SimPO on those pairs, reference = the SFT model.
5. **Evaluation.** On held-out openings each model samples ``EVAL_SAMPLES`` continuations:
   mean reward and the sampled KL(π ‖ π_SFT) (mean Σ_t log π − log π_SFT over its own
   samples, prefopt.eval.sampled). Baseline: best-of-N of the SFT model (N = 1 … 16), whose
   KL to the SFT model is log N − (N − 1)/N (the standard analytic value for best-of-N).
6. **Output.** ``frontier.png`` (reward against KL, every method), ``frontier.csv``/``.md``
   and ``experiment.json`` (settings, timings, pair counts) in OUTPUT_DIR.
"""
from __future__ import annotations

import csv
import json
import math
import random
import re
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "demo" / "data" / "dpo_en_demo.json"
OPENING_WORDS = 3
SENTENCE_WORDS = (8, 24)
MODEL_SHAPE = dict(arch="llama", hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate_size=256,
                   max_positions=96)
MAX_LENGTH, MAX_NEW = 48, 20
PAIR_SAMPLES, MIN_GAP, EVAL_SAMPLES = 4, 0.05, 4
METHODS = [("DPO β=0.1", {"name": "dpo", "beta": 0.1}), ("DPO β=0.5", {"name": "dpo", "beta": 0.5}),
           ("DPO β=2", {"name": "dpo", "beta": 2.0}), ("DPO β=5", {"name": "dpo", "beta": 5.0}),
           ("IPO β=1", {"name": "ipo", "beta": 1.0}), ("SimPO", {"name": "simpo", "beta": 2.0, "gamma": 1.0})]
PREFERENCE_LR = 5e-4
SIZES = {"full": dict(sft_steps=1200, pair_prompts=1500, dpo_steps=300, eval_prompts=300, best_of=16),
         "quick": dict(sft_steps=20, pair_prompts=24, dpo_steps=2, eval_prompts=8, best_of=4)}


def sentences(limit_seed: int = 0) -> list[dict]:
    """Openings and continuations from the demo texts, shuffled with a fixed seed."""
    records = json.loads(DATA.read_text())
    texts = [t["value"] for r in records for t in r["conversations"] + [r["chosen"], r["rejected"]]]
    seen, out = set(), []
    for text in texts:
        for s in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ")):
            words = s.split()
            if not SENTENCE_WORDS[0] <= len(words) <= SENTENCE_WORDS[1] or max(map(len, words)) > 16 \
                    or not re.fullmatch(r"[A-Za-z0-9 ,.;:'!?()-]+", s):
                continue
            if s in seen:
                continue
            seen.add(s)
            out.append({"prompt": " ".join(words[:OPENING_WORDS]), "completion": " " + " ".join(words[OPENING_WORDS:])})
    random.Random(limit_seed).shuffle(out)
    return out


def _config(**keys):
    """The experiment is one fresh job: a rerun replaces its previous outputs."""
    from prefopt.trainer import DPOConfig
    return DPOConfig(overwrite_output_dir=True, **keys)


def run_sentiment(output_dir: str | Path = "runs/sentiment", quick: bool = False, seed: int = 0) -> dict:
    import torch

    from prefopt.config import GenerateConfig, ModelConfig
    from prefopt.data.report import DataReport
    from prefopt.eval.sampled import Estimate, sample_logps
    from prefopt.generate import TransformersSampler, encode_prompts, generate, load_inference_model
    from prefopt.judges import judge_all, make_judge
    from prefopt.methods.iterative import make_pairs
    from prefopt.models import build_tiny_model, load_tokenizer, save_pretrained, train_tokenizer
    from prefopt.trainer import DPOTrainer, SFTTrainer

    size = SIZES["quick" if quick else "full"]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings, started = {}, time.perf_counter()

    def lap(name):
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        print(f"[sentiment] {name}: {timings[name]} s", flush=True)

    data = sentences(seed)
    held_out = data[:size["eval_prompts"]]
    train = data[size["eval_prompts"]:]
    tokenizer = train_tokenizer([d["prompt"] + d["completion"] for d in train], vocab_size=2048)
    base = save_pretrained(build_tiny_model(len(tokenizer), seed=seed, **MODEL_SHAPE), tokenizer, out / "base")
    common = dict(max_length=MAX_LENGTH, progress_bar=False, logging_steps=50, report_html=False, seed=seed)
    SFTTrainer(str(base), train_dataset=train, args=_config(
        loss="sft", output_dir=str(out / "sft"), learning_rate=3e-3, max_steps=size["sft_steps"],
        per_device_train_batch_size=32, lr_scheduler_type="cosine", warmup_ratio=0.05, **common)).train()
    sft = out / "sft" / "final"
    lap("sft")

    tok = load_tokenizer(str(sft))
    judge = make_judge("vader")

    def sampler(path):
        return TransformersSampler(load_inference_model(ModelConfig(name_or_path=str(path))), tok)

    def prompts(rows):
        return encode_prompts([r["prompt"] for r in rows], tok, MAX_LENGTH, MAX_NEW, DataReport("prompts"))

    sft_sampler = sampler(sft)
    gen_cfg = GenerateConfig(num_samples=PAIR_SAMPLES, max_new_tokens=MAX_NEW, temperature=1.0, batch_size=64)
    gens = generate(sft_sampler, prompts(train[:size["pair_prompts"]]), gen_cfg, seed, progress=False)
    pairs = []
    for g in gens:
        scores = judge_all(judge, [g.prompt] * len(g.samples), [s.text for s in g.samples]).scores
        pairs += make_pairs(g.prompt, [s.text for s in g.samples], scores, "best_worst", MIN_GAP)
    (out / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    lap("pairs")

    eval_cfg = GenerateConfig(num_samples=EVAL_SAMPLES, max_new_tokens=MAX_NEW, temperature=1.0, batch_size=64)
    pad = tok.pad_token_id
    rows = []

    def evaluate(name: str, path: Path, policy_sampler) -> dict:
        gens = generate(policy_sampler, prompts(held_out), eval_cfg, seed + 1, progress=False)
        rewards = judge_all(judge, [g.prompt for g in gens for _ in g.samples], [s.text for g in gens for s in g.samples])
        reward = Estimate.of([v for v in rewards.scores if v is not None])
        kl = Estimate.of([a - b for a, b in zip(sample_logps(policy_sampler.model, gens, pad),
                                                sample_logps(sft_sampler.model, gens, pad))])
        row = {"method": name, "reward": reward.mean, "reward_se": reward.se, "kl": kl.mean, "kl_se": kl.se,
               "model": str(path)}
        print(f"[sentiment] {name}: reward {reward.mean:.4f} ± {reward.se or 0:.4f}, KL {kl.mean:.3f}", flush=True)
        rows.append(row)
        return row

    evaluate("SFT", sft, sft_sampler)
    # best-of-N of the SFT model: the best of N samples per held-out opening
    bon = generate(sft_sampler, prompts(held_out), GenerateConfig(num_samples=size["best_of"], max_new_tokens=MAX_NEW,
                                                                 temperature=1.0, batch_size=64), seed + 2,
                   progress=False)
    scored = [judge_all(judge, [g.prompt] * len(g.samples), [s.text for s in g.samples]).scores for g in bon]
    n = 1
    while n <= size["best_of"]:
        best = [max(v for v in s[:n] if v is not None) for s in scored if any(v is not None for v in s[:n])]
        est = Estimate.of(best)
        rows.append({"method": f"best-of-{n}", "reward": est.mean, "reward_se": est.se,
                     "kl": math.log(n) - (n - 1) / n, "kl_se": 0.0, "model": str(sft)})
        n *= 2
    lap("sft eval + best-of-N")

    for name, loss in METHODS:
        folder = out / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        DPOTrainer(str(sft), None, train_dataset=pairs, args=_config(
            output_dir=str(folder), loss=loss, learning_rate=PREFERENCE_LR, max_steps=size["dpo_steps"],
            per_device_train_batch_size=16, lr_scheduler_type="cosine", warmup_ratio=0.1, **common)).train()
        evaluate(name, folder / "final", sampler(folder / "final"))
        lap(name)
        torch.manual_seed(seed)

    result = {"settings": {"sizes": size, "opening_words": OPENING_WORDS, "max_new_tokens": MAX_NEW,
                           "pair_samples": PAIR_SAMPLES, "min_gap": MIN_GAP, "eval_samples": EVAL_SAMPLES,
                           "model_shape": MODEL_SHAPE, "methods": METHODS, "preference_lr": PREFERENCE_LR,
                           "seed": seed},
              "data": {"sentences": len(data), "sft_examples": len(train), "held_out_openings": len(held_out),
                       "pair_openings": len(gens), "pairs": len(pairs)},
              "timings_s": timings, "rows": rows}
    (out / "experiment.json").write_text(json.dumps(result, indent=2))
    write_table(rows, out)
    plot(rows, out / "frontier.png")
    return result


def write_table(rows: list[dict], out: Path) -> None:
    keys = ("method", "reward", "reward_se", "kl", "kl_se")
    with (out / "frontier.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| method | mean reward (VADER) | ± s.e. | KL(π ‖ π_SFT) | ± s.e. |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['reward']:.4f} | {r['reward_se'] or 0:.4f} | {r['kl']:.3f} | "
                     f"{r['kl_se'] or 0:.3f} |")
    (out / "frontier.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    bon = [r for r in rows if r["method"].startswith("best-of")]
    ax.plot([r["kl"] for r in bon], [r["reward"] for r in bon], "o--", color="gray", label="SFT best-of-N")
    for r in bon:
        ax.annotate(r["method"].replace("best-of-", "N="), (r["kl"], r["reward"]), fontsize=7,
                    xytext=(3, -9), textcoords="offset points", color="gray")
    markers = {"SFT": ("s", "black"), "DPO": ("o", "C0"), "IPO": ("^", "C1"), "SimPO": ("D", "C2")}
    for r in rows:
        if r["method"].startswith("best-of"):
            continue
        marker, colour = next(v for k, v in markers.items() if r["method"].startswith(k))
        ax.errorbar(r["kl"], r["reward"], xerr=r["kl_se"] or 0, yerr=r["reward_se"] or 0, fmt=marker,
                    color=colour, capsize=2)
        ax.annotate(r["method"], (r["kl"], r["reward"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("KL(π ‖ π_SFT), sampled (nats per completion)")
    ax.set_ylabel("mean reward (VADER compound)")
    ax.set_title("Controlled sentiment: reward vs KL (DPO paper, Fig. 2 left)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.subplots_adjust(left=0.13, right=0.97, top=0.91, bottom=0.13)
    fig.savefig(path)
    plt.close(fig)
