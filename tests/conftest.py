"""Shared fixtures: a tokenizer trained on the demo data and tiny random models, built once."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SHARED_DATA = ROOT.parent / "shared" / "data"
DEMO_DATA = ROOT / "prefopt" / "demo" / "data" / "dpo_en_demo.json"

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """The tokenised-data cache of the test session: its own folder, never the user's."""
    import os
    os.environ["PREFOPT_CACHE"] = str(tmp_path_factory.mktemp("prefopt-cache"))


@pytest.fixture(scope="session")
def demo_records() -> list[dict]:
    return json.loads(DEMO_DATA.read_text())


@pytest.fixture(scope="session")
def tokenizer(demo_records):
    """Byte-level BPE (vocab 512) with ChatML template; EOS <|im_end|>, PAD <|pad|>, no BOS."""
    from prefopt.models import train_tokenizer

    texts = [t["value"] for r in demo_records for t in r["conversations"] + [r["chosen"], r["rejected"]]]
    return train_tokenizer(texts, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved 2-layer, 32-wide random Llama with the tokenizer: a local 'hub' directory."""
    from prefopt.models import build_tiny_model, save_pretrained

    model = build_tiny_model(len(tokenizer), hidden_size=32, layers=2, heads=4, kv_heads=2,
                             intermediate_size=64, max_positions=256, seed=0)
    return save_pretrained(model, tokenizer, tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside the repository")
    return SHARED_DATA


def pairs(records: list[dict], n: int) -> list[dict]:
    """The first n demo pairs (ShareGPT records)."""
    return records[:n]


@pytest.fixture(autouse=True)
def _no_end_of_run_report(request, monkeypatch):
    """Runs end by writing report.html (~1 s of matplotlib on this CPU); the many tiny runs of
    the suite skip it, except in tests/test_report.py, which tests it."""
    if request.module.__name__.split(".")[-1] != "test_report":
        monkeypatch.setattr("prefopt.trainer.report_at_end", lambda output_dir, enabled: None)
