"""Side-by-side benchmark: prefopt's DPOTrainer against TRL 1.16's DPOTrainer on CPU.

    .venv/bin/python bench/run.py --out runs/bench

(from the repository root, after ``pip install -e '.[bench]'``). What it does, in order:

1. trains a byte-level BPE tokenizer on the pair texts of ../shared/data/dpo_en_demo.json
   (``prefopt.models.train_tokenizer``), builds a random Llama (``build_tiny_model``) and
   saves both once (``save_pretrained``), so both sides load the same weights from disk;
2. converts the pairs to TRL's conversational format (one JSONL file both sides read) and
   keeps the pairs that fit in --max-length without truncation and tokenise *identically*
   the TRL way (prompt and prompt+completion tokenised jointly, the completion starting
   where they diverge) and the prefopt way (completion after the rendered prompt, EOS last);
3. runs each side in its own process (bench/side_trl.py, bench/side_prefopt.py), the
   order alternating between repeats, for the rows ``matched``, ``best`` and ``memory``;
4. checks that both sides did the same work (first-step loss = ln 2 on both, the same
   first-step log-probs at matched settings, no truncation) and writes the table to stdout,
   OUT/results.json and bench/README.md (between the bench markers).

Keep development runs short: --steps 2 --pairs 16 --max-length 512 --hidden 64 --layers 2.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from side_prefopt import PREFOPT_BEST, PREFOPT_MATCHED  # noqa: E402  (no prefopt import at module level)

DATA = ROOT.parent / "shared" / "data" / "dpo_en_demo.json"
README = BENCH / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
LN2 = math.log(2)

# ChatML as prefopt.models.CHATML, except that a conversation's final assistant turn ends at
# <|im_end|> instead of <|im_end|>\n. With the plain template TRL scores that "\n" as one more
# completion token after EOS, while prefopt drops whitespace after a final EOS (by design):
# every completion would differ by one token. With this one both sides score exactly the same
# tokens (checked pair by pair below), and prompts render exactly as in ChatML.
CHATML_EOS_LAST = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>"
    "{% if not (loop.last and message['role'] == 'assistant') %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# TRL rows: (label, bf16, gradient_checkpointing, precompute_ref_log_probs)
TRL_MATCHED = ("fp32, reference online", False, False, False)
TRL_BEST = [("bf16, precomputed reference", True, False, True),
            ("fp32, precomputed reference", False, False, True)]


# ----------------------------------------------------------------------------- arguments

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/bench", help="output folder (model, data, each side's run, results.json)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8192, help="tokenizer and model vocabulary")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per side and row")
    p.add_argument("--pairs", type=int, default=None,
                   help="pairs in the training file (default: steps x batch size, i.e. one epoch)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in both sides")
    p.add_argument("--rows", default="matched,best,memory", help="comma-separated: matched, best, memory")
    p.add_argument("--repeats", type=int, default=2, help="runs per side and row, the order alternating")
    p.add_argument("--repeat-slow-variants", action="store_true",
                   help="repeat a TRL best-row variant whose first run took more than twice another variant's "
                        "setup + train (by default it runs once: it cannot be TRL's best)")
    p.add_argument("--memory-vocab", type=int, default=32768, help="model vocabulary of the memory row")
    p.add_argument("--memory-steps", type=int, default=2, help="optimizer steps of the memory row")
    p.add_argument("--no-readme", action="store_true", help="do not write the table into bench/README.md")
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in args.rows if r not in ("matched", "best", "memory")]
    if bad:
        p.error(f"unknown rows {bad}; choose from matched, best, memory")
    return args


# ----------------------------------------------------------------------------- model and data

def pair_messages(record: dict) -> dict:
    """ShareGPT record -> TRL's conversational format (system messages kept)."""
    prompt = [{"role": ROLES[m["from"]], "content": m["value"]} for m in record["conversations"]]
    return {"prompt": prompt,
            "chosen": [{"role": ROLES[record["chosen"]["from"]], "content": record["chosen"]["value"]}],
            "rejected": [{"role": ROLES[record["rejected"]["from"]], "content": record["rejected"]["value"]}]}


def build_model_dir(path: Path, tokenizer, args, vocab_size: int) -> dict:
    from prefopt.models import build_tiny_model, save_pretrained

    model = build_tiny_model(vocab_size, "llama", hidden_size=args.hidden, layers=args.layers, heads=args.heads,
                             kv_heads=args.kv_heads, intermediate_size=args.intermediate,
                             max_positions=max(args.max_length, 1024), seed=args.seed)
    save_pretrained(model, tokenizer, path)
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return {"dir": str(path), "vocab_size": vocab_size, "parameters": total, "embedding": embed, "lm_head": head,
            "body": total - embed - head}


def trl_way(tok, pair: dict) -> tuple[list[int], list[int], list[int]]:
    """TRL 1.16's DPOTrainer._prepare_dataset tokenize_fn for conversational pairs."""
    def ids(messages, **kw):
        return tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]

    def common(a, b):
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    prompt = ids(pair["prompt"], add_generation_prompt=True)
    full_c, full_r = ids(pair["prompt"] + pair["chosen"]), ids(pair["prompt"] + pair["rejected"])
    n = min(common(prompt, full_c), common(prompt, full_r))
    return prompt[:n], full_c[n:], full_r[n:]


def prefopt_way(tok, pair: dict) -> tuple[list[int], list[int], list[int]]:
    """prefopt's documented rule: the completion is what the chat template adds after the rendered
    prompt; tokenised with the prompt when the prompt ids stay an exact prefix, on its own
    otherwise; whitespace after a final EOS dropped; EOS appended when missing."""
    eos = tok.eos_token_id
    prompt_text = tok.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
    prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
    out = []
    for role in ("chosen", "rejected"):
        full_text = tok.apply_chat_template(pair["prompt"] + pair[role], tokenize=False)
        full = tok(full_text, add_special_tokens=False)["input_ids"]
        if full[:len(prompt)] == prompt:
            ids = full[len(prompt):]
        else:
            ids = tok(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        end = len(ids)
        while end > 0 and ids[end - 1] != eos and tok.decode([ids[end - 1]]).strip() == "":
            end -= 1
        ids = ids[:end] if end > 0 and ids[end - 1] == eos else ids + [eos]
        out.append(ids)
    return prompt, out[0], out[1]


def prepare(args, out: Path) -> tuple[dict, dict, list[dict]]:
    """Tokenizer, model dirs and the training file. Returns (models, data summary, kept pair stats)."""
    from prefopt.models import CHATML, train_tokenizer

    records = json.loads(DATA.read_text())
    texts = []
    for r in records:
        texts += [m["value"] for m in r["conversations"]] + [r["chosen"]["value"], r["rejected"]["value"]]
    tok = train_tokenizer(texts, vocab_size=args.vocab)
    tok.chat_template = CHATML_EOS_LAST

    models = {"main": build_model_dir(out / "model", tok, args, args.vocab)}
    if "memory" in args.rows:
        models["memory"] = build_model_dir(out / f"model-vocab{args.memory_vocab}", tok, args, args.memory_vocab)

    wanted = args.pairs or args.steps * args.batch_size
    kept, too_long, differ, differ_examples = [], 0, 0, []
    plain_chatml_differ = 0
    for i, record in enumerate(records):
        pair = pair_messages(record)
        t_prompt, t_chosen, t_rejected = trl_way(tok, pair)
        p_prompt, p_chosen, p_rejected = prefopt_way(tok, pair)
        trl_lengths = (len(t_prompt) + len(t_chosen), len(t_prompt) + len(t_rejected))
        pref_lengths = (len(p_prompt) + len(p_chosen), len(p_prompt) + len(p_rejected))
        if max(trl_lengths + pref_lengths) > args.max_length:
            too_long += 1
            continue
        if (t_prompt, t_chosen, t_rejected) != (p_prompt, p_chosen, p_rejected):
            differ += 1
            differ_examples.append({"record": i, "trl": [len(t_prompt), len(t_chosen), len(t_rejected)],
                                    "prefopt": [len(p_prompt), len(p_chosen), len(p_rejected)]})
            continue
        tok.chat_template = CHATML  # what the tokenizer's own ChatML would give (reported only)
        if trl_way(tok, pair) != prefopt_way(tok, pair):
            plain_chatml_differ += 1
        tok.chat_template = CHATML_EOS_LAST
        if len(kept) < wanted:
            kept.append({"record": i, "pair": pair, "prompt": len(p_prompt), "chosen": len(p_chosen),
                         "rejected": len(p_rejected)})
    if len(kept) < wanted:
        print(f"WARNING: only {len(kept)} pairs fit (asked for {wanted})", flush=True)

    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "pairs.jsonl"
    path.write_text("".join(json.dumps(k["pair"], ensure_ascii=False) + "\n" for k in kept))
    stats = [{k: v for k, v in item.items() if k != "pair"} for item in kept]
    (data_dir / "pair_tokens.json").write_text(json.dumps(stats))
    summary = {"file": str(path), "records": len(records), "too_long": too_long, "tokenisation_differs": differ,
               "tokenisation_differs_examples": differ_examples[:10], "fit_and_agree": len(records) - too_long - differ,
               "used": len(kept),
               "plain_chatml_would_differ": plain_chatml_differ,
               "checked_plain_chatml": len(records) - too_long - differ}
    return models, summary, stats


def epoch_order(n: int, seed: int, count: int) -> list[int]:
    """The pairs trained, in order: a permutation seeded with seed + epoch per epoch (prefopt's
    order, which side_trl.py imposes on TRL too)."""
    import torch

    order, epoch = [], 0
    while len(order) < count:
        gen = torch.Generator().manual_seed(seed + epoch)
        order += torch.randperm(n, generator=gen).tolist()
        epoch += 1
    return order[:count]


def pair_tokens(stat: dict) -> int:
    """Tokens of the naive two-sequence layout: prompt+chosen and prompt+rejected, no padding."""
    return 2 * stat["prompt"] + stat["chosen"] + stat["rejected"]


def step_tokens(stats: list[dict], order: list[int], batch: int) -> list[int]:
    return [sum(pair_tokens(stats[i]) for i in order[s:s + batch]) for s in range(0, len(order), batch)]


# ----------------------------------------------------------------------------- running the sides

def cpu_seconds_busy() -> float:
    """CPU seconds all processes on the machine have used so far (/proc/stat, non-idle)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def run_side(side: str, settings: dict, run_dir: Path) -> dict:
    # A fresh folder: both TRL (a datasets cache file) and prefopt (OUTPUT_DIR/reference_cache)
    # reuse a precomputed reference found there, which would skip the precompute.
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = {**settings, "out_dir": str(run_dir)}
    settings_path, result_path, log_path = run_dir / "settings.json", run_dir / "result.json", run_dir / "log.txt"
    settings_path.write_text(json.dumps(settings, indent=2))
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(run_dir / "hf_datasets_cache"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": str(settings["threads"]), "MKL_NUM_THREADS": str(settings["threads"]),
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONHASHSEED": "0"}
    script = BENCH / f"side_{side}.py"
    started, busy_before = time.time(), cpu_seconds_busy()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, str(script), str(settings_path), str(result_path)], cwd=ROOT,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, busy = time.time() - started, cpu_seconds_busy() - busy_before
    if proc.returncode != 0 or not result_path.is_file():
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise SystemExit(f"{side} side failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    own = (children_after.ru_utime - children_before.ru_utime) + (children_after.ru_stime - children_before.ru_stime)
    # CPU time used by anything but this side while it ran, as a share of the machine: other
    # work on the same cores makes the timings meaningless.
    result.update(wall_s=wall, cpu_s=own, foreign_cpu_share=max(0.0, busy - own) / (wall * os.cpu_count()))
    return result


def plan(args, models: dict, data: dict) -> list[dict]:
    """Every (row, side, variant) run of one repeat, in prefopt-first order."""
    base = {"data": data["file"], "batch_size": args.batch_size, "learning_rate": args.lr,
            "max_length": args.max_length, "seed": args.seed, "threads": args.threads, "align_order": True}
    runs = []
    for row in args.rows:
        model = models["memory" if row == "memory" else "main"]["dir"]
        steps = args.memory_steps if row == "memory" else args.steps
        common = {**base, "row": row, "model_dir": model, "steps": steps}
        runs.append({"row": row, "side": "prefopt", "label": "prefopt",
                     "settings": {**common, "variant": "best" if row == "best" else "matched"}})
        for label, bf16, gc, pre in (TRL_BEST if row == "best" else [TRL_MATCHED]):
            runs.append({"row": row, "side": "trl", "label": label,
                         "settings": {**common, "variant": label, "bf16": bf16, "gradient_checkpointing": gc,
                                      "precompute_ref_log_probs": pre}})
    return runs


# ----------------------------------------------------------------------------- checks

def check_run(run: dict, result: dict, n_pairs: int) -> list[str]:
    warnings = []
    row, side = run["row"], run["side"]
    loss = result.get("first_step_loss")
    tol = 1e-4 if row != "best" else 1e-2
    if loss is None or not abs(loss - LN2) <= tol:
        warnings.append(f"{row}/{run['label']}: first-step loss {loss} is not ln 2 = {LN2:.6f} (tolerance {tol})")
    if result.get("steps") != run["settings"]["steps"] or result.get("steps_observed") != run["settings"]["steps"]:
        warnings.append(f"{row}/{run['label']}: trained {result.get('steps')} steps "
                        f"({result.get('steps_observed')} optimizer steps seen), expected {run['settings']['steps']}")
    if row != "memory" and result.get("foreign_cpu_share", 0) > 0.10:  # the memory row reports no timings
        warnings.append(f"{row}/{run['label']}: other processes used {result['foreign_cpu_share']:.0%} of the CPUs "
                        "during this run: its timings are not trustworthy")
    if side == "trl" and result.get("train_examples") != n_pairs:
        warnings.append(f"{row}/{run['label']}: TRL kept {result.get('train_examples')} of {n_pairs} pairs")
    if side == "prefopt":
        for report in result.get("data_report", []):
            if report.get("dataset") not in (None, "train"):
                continue
            if report.get("examples") != n_pairs:
                warnings.append(f"{row}/prefopt: kept {report.get('examples')} of {n_pairs} pairs")
            counts = {k: v for k, v in report.items() if isinstance(v, int) and v
                      and re.search(r"truncat|mismatch|identical|too_long", k)}
            if counts or report.get("rejected"):
                warnings.append(f"{row}/prefopt: data report counts {counts}, rejected {report.get('rejected')} "
                                "(truncation, boundary mismatch or skipped records: not the same pairs as TRL's)")
    return warnings


def check_pair(row: str, trl: dict, pref: dict) -> tuple[list[str], dict]:
    """Both sides of one row and repeat: same first-step loss; at matched settings the same
    first-step log-probs (same pairs, same order, same tokens, same weights)."""
    warnings, info = [], {}
    a, b = trl.get("first_step_loss"), pref.get("first_step_loss")
    if a is not None and b is not None:
        info["first_step_loss_diff"] = abs(a - b)
        tol = 1e-4 if row != "best" else 1e-2
        if abs(a - b) > tol:
            warnings.append(f"{row}: first-step losses differ: TRL {a:.6f} vs prefopt {b:.6f}")
    if row in ("matched", "memory"):
        for key in ("logps/chosen", "logps/rejected"):
            x, y = trl.get("first_step_logged", {}).get(key), pref.get("first_step_logged", {}).get(key)
            if x is None or y is None:
                warnings.append(f"{row}: {key} missing at step 1 (TRL {x}, prefopt {y})")
                continue
            rel = abs(x - y) / max(abs(x), abs(y), 1e-9)
            info[f"{key}_rel_diff"] = rel
            if rel > 1e-4:
                warnings.append(f"{row}: step-1 {key} differ (TRL {x:.4f}, prefopt {y:.4f}): the sides did not "
                                "see the same pairs in the same order, or tokenised them differently")
    return warnings, info


# ----------------------------------------------------------------------------- aggregation and output

METRICS = ("setup_s", "train_s", "total_s", "tokens_per_s", "peak_rss_mb", "training_rss_mb", "first_step_loss")


def aggregate(results: list[dict], tokens: int | None) -> dict:
    agg = {}
    for r in results:
        r["total_s"] = r["setup_s"] + r["train_s"]
        r["tokens_per_s"] = tokens / r["train_s"] if tokens else None
    for key in METRICS + ("import_s", "train_s_callback", "setup_s_callback", "train_s_loop", "rss_before_train_mb",
                           "foreign_cpu_share"):
        values = [r[key] for r in results if r.get(key) is not None]
        agg[key] = statistics.median(values) if values else None
    agg["runs"] = len(results)
    return agg


def ratios(trl: dict, pref: dict) -> dict:
    def div(a, b):
        return a / b if a and b else None
    return {"train_speed": div(trl["train_s"], pref["train_s"]),
            "total_speed": div(trl["total_s"], pref["total_s"]),
            "peak_rss": div(pref["peak_rss_mb"], trl["peak_rss_mb"]),
            "training_rss": div(pref["training_rss_mb"], trl["training_rss_mb"])}


TARGETS = {  # from the issue: (ratio, comparison, bound, wording)
    "matched": [("train_speed", ">=", 2.5, "train ≥ 2.5×"), ("peak_rss", "<=", 0.6, "peak RSS ≤ 0.6×")],
    "best": [("total_speed", ">=", 4.0, "setup + train ≥ 4×")],
    "memory": [("peak_rss", "<=", 0.6, "peak RSS ≤ 0.6×")],
}


def targets_met(row: str, r: dict) -> str:
    parts = []
    for key, op, bound, text in TARGETS[row]:
        value = r.get(key)
        ok = value is not None and (value >= bound if op == ">=" else value <= bound)
        parts.append(f"{text}: {'met' if ok else 'not met'}")
    return "; ".join(parts)


def fmt(value, digits=1):
    if value is None:
        return "–"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def render(summary: dict) -> str:
    rows = summary["rows"]
    lines = ["| row | side | runs | setup s | train s | total s | tokens/s | peak RSS MB | training RSS MB | "
             "first-step loss |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        memory_only = name == "memory"
        for side_label, m in row["sides"]:
            if memory_only:
                cells = ["–"] * 4
            else:
                cells = [fmt(m["setup_s"], 2), fmt(m["train_s"], 2), fmt(m["total_s"], 2), fmt(m["tokens_per_s"], 0)]
            lines.append(f"| {name} | {side_label} | {m['runs']} | " + " | ".join(cells) + f" | {fmt(m['peak_rss_mb'], 0)} | "
                         f"{fmt(m['training_rss_mb'], 0)} | {fmt(m['first_step_loss'], 4)} |")
    lines += ["", "| row | speed, train (TRL s / prefopt s) | speed, setup + train | peak RSS (prefopt / TRL) | "
                  "training RSS (prefopt / TRL) | targets |", "|---|---:|---:|---:|---:|---|"]
    for name, row in rows.items():
        r = row["ratios"]
        speed = ["–", "–"] if name == "memory" else [fmt(r["train_speed"], 2) + "×", fmt(r["total_speed"], 2) + "×"]
        lines.append(f"| {name} | {speed[0]} | {speed[1]} | {fmt(r['peak_rss'], 2)}× | {fmt(r['training_rss'], 2)}× | "
                     f"{targets_met(name, r)} |")
    return "\n".join(lines)


def machine() -> dict:
    import torch
    import transformers
    import trl

    cpu = "unknown"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = match.group(1).strip() if match else platform.processor()
    except OSError:
        pass
    import prefopt

    source = Path(prefopt.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "prefopt"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip())
    except OSError:
        commit, dirty = "?", False
    commit += "+uncommitted" if dirty else ""
    if source != ROOT / "prefopt":  # e.g. PYTHONPATH points at another copy
        commit = f"{source} (repository at {commit})"
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "python": platform.python_version(), "prefopt_commit": commit,
            "date": datetime.date.today().isoformat()}


def markdown(summary: dict) -> str:
    m, shape, data = summary["machine"], summary["shape"], summary["data"]
    best_trl = summary["rows"].get("best", {}).get("trl_best")
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['usable_cores']} of {m['cores']} cores), torch {m['torch']}, "
        f"transformers {m['transformers']}, trl {m['trl']}, prefopt at {m['prefopt_commit']}.",
        "",
        "```",
        summary["command"],
        "```",
        "",
        f"Model: random Llama, hidden {shape['hidden']}, {shape['layers']} layers, {shape['heads']} heads "
        f"({shape['kv_heads']} KV), MLP {shape['intermediate']}, vocab {shape['vocab']}: "
        f"**{shape['parameters'] / 1e6:.2f}M parameters** ({shape['body'] / 1e6:.2f}M body, "
        f"{(shape['embedding'] + shape['lm_head']) / 1e6:.2f}M embedding + LM head)"
        + (f"; memory row vocab {shape['memory_vocab']}: {shape['memory_parameters'] / 1e6:.2f}M."
           if shape.get("memory_parameters") else "."),
        f"Data: {data['used']} pairs of dpo_en_demo.json ({data['fit_and_agree']} of {data['records']} fit in "
        f"{summary['settings']['max_length']} tokens and tokenise identically both ways; {data['too_long']} too "
        f"long, {data['tokenisation_differs']} tokenised differently), {summary['tokens_trained']:,} tokens "
        f"trained per side (naive layout, no padding). Batch {summary['settings']['batch_size']}, "
        f"{summary['settings']['steps']} steps (memory row: {summary['settings']['memory_steps']}), "
        f"{summary['settings']['repeats']} repeat(s), medians.",
        "",
        render(summary),
        "",
        f"TRL best: {best_trl}." if best_trl else "",
        f"prefopt best: defaults + `PREFOPT_BEST = {json.dumps(summary['prefopt_best'])}`; matched: "
        f"`{json.dumps(summary['prefopt_matched'])}`.",
    ]
    if summary["warnings"]:
        lines += ["", "**Warnings:**", ""] + [f"- {w}" for w in summary["warnings"]]
    return "\n".join(line for line in lines if line is not None)


def update_readme(text: str) -> None:
    readme = README.read_text()
    if START not in readme or END not in readme:
        print(f"note: {README} has no {START} ... {END} markers; not updated")
        return
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{text}\n{END}{tail}")


# ----------------------------------------------------------------------------- main

def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if not out.is_absolute():
        out = ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    command = ".venv/bin/python bench/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"note: load average {load:.2f} before starting; other work on these cores distorts timings", flush=True)
    print("preparing tokenizer, model and data ...", flush=True)
    models, data, stats = prepare(args, out)
    n = len(stats)
    shape = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
             "intermediate": args.intermediate, "vocab": args.vocab, **{k: models["main"][k] for k in
                                                                       ("parameters", "body", "embedding", "lm_head")}}
    if "memory" in models:
        shape.update(memory_vocab=args.memory_vocab, memory_parameters=models["memory"]["parameters"])
    print(f"model: {shape['parameters']:,} parameters ({shape['body']:,} body, {shape['embedding']:,} embedding, "
          f"{shape['lm_head']:,} LM head)", flush=True)
    print(f"data: {data['records']} records, {data['too_long']} longer than {args.max_length} tokens, "
          f"{data['tokenisation_differs']} tokenised differently by TRL and prefopt, {data['fit_and_agree']} fit "
          f"and agree; {n} used (the plain ChatML template would make {data['plain_chatml_would_differ']} of "
          f"{data['checked_plain_chatml']} differ: TRL keeps the newline after <|im_end|>)", flush=True)

    order = epoch_order(n, args.seed, args.steps * args.batch_size)
    expected_steps = step_tokens(stats, order, args.batch_size)
    tokens_trained = sum(expected_steps)
    whole_epochs = (args.steps * args.batch_size) % n == 0
    warnings = []
    if not whole_epochs:
        warnings.append(f"steps x batch ({args.steps * args.batch_size}) is not a whole number of epochs over {n} "
                        "pairs: token counts rely on both sides training in the same order (checked at step 1)")

    runs = plan(args, models, data)
    host = machine()  # before the runs: the prefopt code they import, not what it became since
    results: dict[tuple[str, str], list[dict]] = {}
    per_repeat = []
    for rep in range(args.repeats):
        ordered = runs if rep % 2 == 0 else _trl_first(runs)
        if rep and not args.repeat_slow_variants:
            ordered = [r for r in ordered if not _clearly_slower(r, results)]
        got = {}
        for run in ordered:
            print(f"[repeat {rep + 1}/{args.repeats}] {run['row']:8s} {run['side']:8s} {run['label']} ...",
                  end=" ", flush=True)
            run_dir = out / "runs" / f"r{rep}" / run["row"] / (run["side"] + ("" if run["side"] == "prefopt" else
                                                                               "-" + _slug(run["label"])))
            result = run_side(run["side"], run["settings"], run_dir)
            print(f"setup {result['setup_s']:.2f}s train {result['train_s']:.2f}s peak {result['peak_rss_mb']:.0f}MB "
                  f"loss@1 {result.get('first_step_loss')} (other CPU use {result['foreign_cpu_share']:.0%})", flush=True)
            warnings += check_run(run, result, n)
            got[(run["row"], run["label"])] = result
            results.setdefault((run["row"], run["label"]), []).append(result)
        checks = {}
        for row in args.rows:
            trl_labels = [r["label"] for r in runs if r["row"] == row and r["side"] == "trl"]
            for label in [x for x in trl_labels if (row, x) in got]:
                w, info = check_pair(row, got[(row, label)], got[(row, "prefopt")])
                warnings += [f"[repeat {rep + 1}] {x}" for x in w]
                checks[f"{row}/{label}"] = info
            if row == "matched":
                seen = got[(row, "prefopt")].get("step_tokens")
                checks["matched/prefopt_step_tokens_match_naive_layout"] = seen == expected_steps
        per_repeat.append({"order": [f"{r['row']}/{r['label']}" for r in ordered], "checks": checks})

    summary_rows = {}
    for row in args.rows:
        row_tokens = None if row == "memory" else tokens_trained
        pref = aggregate(results[(row, "prefopt")], row_tokens)
        trl_aggs = {label: aggregate(results[(row, label)], row_tokens)
                    for label in [r["label"] for r in runs if r["row"] == row and r["side"] == "trl"]}
        trl_label = min(trl_aggs, key=lambda label: trl_aggs[label]["total_s"])
        sides = [(f"TRL ({label})", agg) for label, agg in trl_aggs.items()] + [("prefopt", pref)]
        summary_rows[row] = {"sides": sides, "trl_best": trl_label if row == "best" else None,
                             "ratios": ratios(trl_aggs[trl_label], pref)}

    for w in warnings:
        print(f"\n!!!!!!!! WARNING: {w}", flush=True)
    summary = {
        "command": command, "machine": host, "shape": shape, "data": data, "tokens_trained": tokens_trained,
        "settings": {"max_length": args.max_length, "batch_size": args.batch_size, "steps": args.steps,
                     "memory_steps": args.memory_steps, "learning_rate": args.lr, "seed": args.seed,
                     "threads": args.threads, "repeats": args.repeats, "rows": args.rows},
        "prefopt_best": PREFOPT_BEST, "prefopt_matched": PREFOPT_MATCHED,
        "rows": summary_rows, "per_repeat": per_repeat, "warnings": warnings,
        "runs": {f"{row}/{label}": res for (row, label), res in results.items()},
    }
    text = markdown(summary)
    print("\n" + text, flush=True)
    serialisable = {**summary, "rows": {k: {**v, "sides": [{"side": s, **m} for s, m in v["sides"]]}
                                        for k, v in summary_rows.items()}}
    (out / "results.json").write_text(json.dumps(serialisable, indent=2))
    print(f"\nwrote {out / 'results.json'}", flush=True)
    if not args.no_readme:
        update_readme(text)
        print(f"updated {README}", flush=True)


def _clearly_slower(run: dict, results: dict) -> bool:
    """A TRL best-row variant whose first run took more than twice the setup + train of another
    variant's (bf16 on a CPU without bf16 matrix units: ~6x fp32 here) is not repeated."""
    if run["row"] != "best" or run["side"] != "trl":
        return False
    first = {label: runs[0]["setup_s"] + runs[0]["train_s"] for (row, label), runs in results.items()
             if row == "best" and label != "prefopt"}
    return first.get(run["label"], 0) > 2 * min(first.values(), default=float("inf"))


def _trl_first(runs: list[dict]) -> list[dict]:
    out = []
    for row in dict.fromkeys(r["row"] for r in runs):
        group = [r for r in runs if r["row"] == row]
        out += [r for r in group if r["side"] == "trl"] + [r for r in group if r["side"] == "prefopt"]
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


if __name__ == "__main__":
    main()
