"""``prefopt report OUTPUT_DIR``: one self-contained HTML page a person can look at.

    OUTPUT_DIR/metrics.jsonl ─┐
    OUTPUT_DIR/data_report.json, config.yaml, eval.json, sampled_eval.json ─┼─▶ OUTPUT_DIR/report.html
    OUTPUT_DIR/samples/*.jsonl, iter-N/generations.jsonl ─┘

Plots (matplotlib, PNG embedded as base64, so the file opens anywhere on its own): loss,
rewards/chosen against rewards/rejected, rewards/margins, rewards/accuracies, KL, grad norm
and learning rate over steps, train and eval on the same axes; then the final metrics, the
data report, the configuration, and sample generations side by side (policy against
reference) when the run has any. Runs end by writing it (``train.report_html``).
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path

from prefopt.errors import ConfigError

log = logging.getLogger("prefopt")

PLOTS = [  # (title, [metric names]); a plot is drawn when any of its series has values
    ("loss", ["loss"]),
    ("rewards", ["rewards/chosen", "rewards/rejected"]),
    ("reward margin", ["rewards/margins"]),
    ("reward accuracy", ["rewards/accuracies"]),
    ("KL", ["kl", "kl/chosen", "kl/rejected"]),
    ("grad norm", ["grad_norm"]),
    ("learning rate", ["learning_rate"]),
]


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
    return [p[0] for p in points], [float(p[1]) for p in points]


def plot_png(title: str, names: list[str], train: list[dict], evals: list[dict]) -> str | None:
    """A PNG (base64) of the train (solid) and eval (dashed, markers) series, or None if empty."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    drawn = 0
    for i, name in enumerate(names):
        colour = f"C{i}"
        x, y = series(train, name)
        if x:
            ax.plot(x, y, color=colour, label=f"train {name}")
            drawn += 1
        x, y = series(evals, f"eval/{name}")
        if x:
            ax.plot(x, y, color=colour, linestyle="--", marker="o", label=f"eval {name}")
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.13, right=0.98, top=0.9, bottom=0.16)  # tight_layout costs ~50 ms a plot
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _table(rows: list[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _samples(out: Path) -> list[tuple[str, list[dict], list[dict]]]:
    """(title, policy lines, reference lines) for the sample files a run left."""
    found = []
    reference = read_jsonl(out / "samples" / "reference.jsonl")
    for path in sorted((out / "samples").glob("policy-*.jsonl")):
        found.append((path.stem, read_jsonl(path), reference))
    for path in sorted(out.glob("iter-*/generations.jsonl")):
        found.append((f"{path.parent.name} samples", read_jsonl(path), []))
    if (out / "generations.jsonl").is_file():
        found.append(("generations", read_jsonl(out / "generations.jsonl"), []))
    return found


def _sample_table(policy: list[dict], reference: list[dict], limit: int = 8) -> str:
    head = "<tr><th>prompt</th><th>policy</th>" + ("<th>reference</th>" if reference else "") + "</tr>"
    rows = []
    for i, line in enumerate(policy[:limit]):
        prompt = line["prompt"] if isinstance(line["prompt"], str) else \
            "\n".join(f"{m['role']}: {m['content']}" for m in line["prompt"])
        pol = "<hr>".join(html.escape(c["text"]) for c in line["completions"])
        ref = "<hr>".join(html.escape(c["text"]) for c in reference[i]["completions"]) if i < len(reference) else ""
        rows.append(f"<tr><td><pre>{html.escape(prompt[-400:])}</pre></td><td>{pol}</td>"
                    + (f"<td>{ref}</td>" if reference else "") + "</tr>")
    return f"<table class='samples'>{head}{''.join(rows)}</table>"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
.plots{display:flex;flex-wrap:wrap;gap:12px} .plots figure{margin:0} .plots img{border:1px solid #eee}
table{border-collapse:collapse;font-size:.9em} th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;
vertical-align:top} pre{white-space:pre-wrap;margin:0;max-width:420px} .samples td{max-width:420px}"""


def write_report(output_dir: str | Path) -> Path:
    """Write OUTPUT_DIR/report.html from what the run left there."""
    out = Path(output_dir)
    rows = read_jsonl(out / "metrics.jsonl")
    if not rows and not (out / "sampled_eval.json").is_file():
        raise ConfigError(f"{out}: no metrics.jsonl (nor sampled_eval.json) to report on")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("the report needs matplotlib (pip install 'prefopt[report]')") from None
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    images = [(title, png) for title, names in PLOTS if (png := plot_png(title, names, train, evals))]
    parts = [f"<h1>prefopt run: {html.escape(str(out))}</h1>"]
    if images:
        parts.append("<h2>Training curves</h2><div class='plots'>" + "".join(
            f"<figure><img alt='{html.escape(t)}' src='data:image/png;base64,{png}'></figure>" for t, png in images)
            + "</div>")
    final = {**(train[-1] if train else {}), **(evals[-1] if evals else {})}
    if final:
        parts.append("<h2>Final metrics</h2>" + _table(sorted(final.items())))
    for name, title in (("eval.json", "Evaluation"), ("sampled_eval.json", "Sampled evaluation"),
                        ("summary.json", "Rounds")):
        path = out / name
        if path.is_file():
            parts.append(f"<h2>{title}</h2><pre>{html.escape(path.read_text())}</pre>")
    if (out / "data_report.json").is_file():
        for report in json.loads((out / "data_report.json").read_text()):
            parts.append(f"<h2>Data: {html.escape(str(report.get('dataset')))}</h2>" + _table(list(report.items())))
    for title, policy, reference in _samples(out):
        parts.append(f"<h2>Samples: {html.escape(title)}</h2>" + _sample_table(policy, reference))
    if (out / "config.yaml").is_file():
        parts.append(f"<h2>Configuration</h2><pre>{html.escape((out / 'config.yaml').read_text())}</pre>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>prefopt report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    path = out / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def report_at_end(output_dir: Path, enabled: bool) -> None:
    """The end-of-run report: written when enabled, a one-line warning when it cannot be."""
    if not enabled:
        return
    try:
        path = write_report(output_dir)
        log.info("report: %s", path)
    except ConfigError as e:
        log.warning("no report.html: %s", e)
