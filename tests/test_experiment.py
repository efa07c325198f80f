"""The built-in sentiment experiment end to end at smoke size: every stage runs, the table and
the plot are written, and the numbers are what the stages computed (best-of-N's analytic KL,
the SFT model's zero KL to itself, pairs ordered by VADER)."""
import json
import math

from prefopt.cli import main
from prefopt.experiments.sentiment import sentences


def test_openings_are_cut_from_clean_sentences():
    data = sentences(0)
    assert len(data) > 3000
    for row in data[:200]:
        assert len(row["prompt"].split()) == 3 and row["completion"].startswith(" ")
        assert 5 <= len(row["completion"].split()) <= 21


def test_sentiment_experiment_quick(tmp_path, capsys):
    out = tmp_path / "sentiment"
    assert main(["experiment", "sentiment", "--quick", "--output-dir", str(out)]) == 0
    result = json.loads((out / "experiment.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert {"SFT", "best-of-1", "best-of-2", "best-of-4", "DPO β=0.1", "IPO β=1", "SimPO"} <= rows.keys()
    assert rows["SFT"]["kl"] == 0.0  # the SFT model against itself
    for n in (1, 2, 4):
        assert rows[f"best-of-{n}"]["kl"] == math.log(n) - (n - 1) / n
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["score_chosen"] - p["score_rejected"] > 0.05 for p in pairs)
    assert result["data"]["pairs"] == len(pairs)
    assert (out / "frontier.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "frontier.md").read_text().startswith("| method | mean reward (VADER)")
    assert "frontier.png" in capsys.readouterr().out
