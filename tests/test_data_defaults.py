"""Defaults that train on real data (issue 9): at any data.max_length the demo data, HH and a
conversational set tokenise without stopping; every cut and every drop is counted in one line;
``data.truncation: strict`` restores the old stop; TRL's other layouts (text, implicit prompts)
are detected.

The default rule (prefopt.data.tokenize): an example longer than max_length gives up prompt
tokens (keep_end: the most recent ones) until its longest completion fits, but keeps at least
max_length // 2; the completions are then cut to the room left; a pair cut to chosen == rejected
is dropped and counted.
"""
from __future__ import annotations

import copy
import gzip
import itertools
import json
import logging
import math

import pytest

from prefopt.config import DataConfig
from prefopt.data.cache import cache_key
from prefopt.data.pipeline import load_examples, prepare_datasets
from prefopt.data.report import DataReport, write_reports
from prefopt.data.schema import Origin, PreferenceExample
from prefopt.data.tokenize import Encoder, ExampleDropped
from prefopt.errors import ConfigError, DataError

from conftest import SHARED_DATA

LONG = "one two three four five six seven eight nine ten eleven twelve"  # 32 tokens of the fixture tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pair(prompt, chosen, rejected) -> PreferenceExample:
    return PreferenceExample(prompt, chosen, rejected, Origin("<test>", 0))


def conversational(records: list[dict]) -> list[dict]:
    """The demo pairs as TRL's conversational layout: {prompt: [messages], chosen/rejected: [message]}."""
    role = {"system": "system", "human": "user", "gpt": "assistant"}
    return [{"prompt": [{"role": role[t["from"]], "content": t["value"]} for t in r["conversations"]],
             "chosen": [{"role": "assistant", "content": r["chosen"]["value"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]["value"]}]} for r in records]


@pytest.fixture(scope="module")
def sources(demo_records) -> dict:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside the repository")
    with gzip.open(SHARED_DATA / "hh_harmless_test.jsonl.gz", "rt", encoding="utf-8") as fh:
        hh = [json.loads(line) for line in itertools.islice(fh, 300)]  # record 87 has an empty chosen reply
    return {"demo": demo_records, "hh": hh, "conversational": conversational(demo_records[:100])}


@pytest.fixture(scope="module")
def untruncated(tokenizer, sources) -> dict:
    """Every example of each source encoded with no length limit, by record index."""
    out = {}
    for name in ("demo", "hh"):
        train, _ = prepare_datasets(DataConfig(max_length=1 << 20), tokenizer, "paired", train_source=sources[name])
        assert train.report.counts == {} and train.report.examples == 300
        out[name] = {e.origin.index: e for e in train.examples}
    return out


# Exact counts with the fixture tokenizer (a 512-token BPE, so texts are ~3x longer than with a real one).
EXPECTED = {("demo", 128): "300 examples; truncated: 270 prompts, 267 chosen, 283 rejected",
            ("demo", 1024): "300 examples; truncated: 130 prompts, 152 chosen, 157 rejected",
            ("demo", 4096): "300 examples; truncated: 23 prompts, 1 rejected",
            ("hh", 128): "300 examples; truncated: 223 prompts, 127 chosen, 167 rejected",
            ("hh", 256): "300 examples; truncated: 163 prompts, 49 chosen, 66 rejected",
            ("hh", 1024): "300 examples; truncated: 6 prompts, 3 rejected",
            ("hh", 4096): "300 examples; truncated: none"}


@pytest.mark.parametrize("name,max_length", list(EXPECTED))
def test_real_data_fits_by_default_at_every_length(tokenizer, sources, untruncated, name, max_length):
    """Default settings (data.on_error: raise): nothing stops; each example is its untruncated self
    cut by the rule, within max_length; the counts add up and are the ones in the summary line."""
    train, _ = prepare_datasets(DataConfig(max_length=max_length), tokenizer, "paired", train_source=sources[name])
    report = train.report
    assert report.records == report.examples + sum(report.dropped.values()) + sum(report.rejected.values())
    assert report.summary() == f"train: 300 records ({'sharegpt' if name == 'demo' else 'hh'}) -> {EXPECTED[name, max_length]}"
    prompts_cut = chosen_cut = rejected_cut = 0
    for e in train.examples:
        full = untruncated[name][e.origin.index]
        longest = max(len(full.completions["chosen"]), len(full.completions["rejected"]))
        assert len(e.prompt_ids) + max(map(len, e.completions.values())) <= max_length
        if len(full.prompt_ids) + longest > max_length:  # the rule: room for the longest, or half the window
            keep = min(len(full.prompt_ids), max(max_length - longest, max_length // 2))
        else:
            keep = len(full.prompt_ids)
        assert e.prompt_ids == full.prompt_ids[len(full.prompt_ids) - keep:]  # keep_end: the latest tokens
        room = max_length - keep
        assert e.completions == {r: full.completions[r][:room] for r in ("chosen", "rejected")}
        assert len(e.prompt_ids) >= min(len(full.prompt_ids), max_length // 2)
        prompts_cut += keep < len(full.prompt_ids)
        chosen_cut += room < len(full.completions["chosen"])
        rejected_cut += room < len(full.completions["rejected"])
    assert (prompts_cut, chosen_cut, rejected_cut) == (
        report.counts["prompt_truncated"], report.counts["chosen_truncated"], report.counts["rejected_truncated"])


def test_conversational_set_fits_by_default(tokenizer, sources):
    train, _ = prepare_datasets(DataConfig(max_length=128), tokenizer, "paired", train_source=sources["conversational"])
    assert train.report.format == "conversational"
    twin, _ = prepare_datasets(DataConfig(max_length=128), tokenizer, "paired", train_source=sources["demo"][:100])
    assert train.report.summary() == twin.report.summary().replace("sharegpt", "conversational")
    assert [(e.prompt_ids, e.completions) for e in train.examples] == [(e.prompt_ids, e.completions)
                                                                      for e in twin.examples]
    assert all(len(e.prompt_ids) + max(map(len, e.completions.values())) <= 128 for e in train.examples)
    # keep_end keeps the generation prompt: the completion still follows "<|im_start|>assistant\n"
    assert all(tokenizer.decode(e.prompt_ids).endswith("<|im_start|>assistant\n") for e in train.examples)


# ---------------------------------------------------------------------------- the rule, by hand
def test_keep_end_keeps_the_last_prompt_tokens_leaving_room_for_the_longest_completion(tokenizer):
    eos = tokenizer.eos_token_id
    full = ids(tokenizer, LONG)
    assert len(full) == 32 and len(ids(tokenizer, " yes")) == 2
    report = DataReport("train")
    # longest completion " yes" + EOS = 3 tokens: the prompt keeps 11 - 3 = 8 (more than 11 // 2)
    enc = Encoder(tokenizer, 11).encode(pair(LONG, " yes", " no"), report)
    assert enc.prompt_ids == full[-8:] == [302, 293, 89, 271, 260, 90, 355, 308]
    assert tokenizer.decode(enc.prompt_ids) == " eleven twelve"
    assert enc.completions == {"chosen": ids(tokenizer, " yes") + [eos], "rejected": ids(tokenizer, " no") + [eos]}
    assert report.counts == {"prompt_truncated": 1}

    # a completion longer than the window: the prompt keeps half (16 // 2 = 8), the completions the rest
    report = DataReport("train")
    long_answer = ids(tokenizer, LONG + " " + LONG)[len(full):]  # " one two ..." after LONG
    enc = Encoder(tokenizer, 16).encode(pair(LONG, " " + LONG, " no"), report)
    assert enc.prompt_ids == full[-8:]
    assert enc.completions["chosen"] == long_answer[:8] and eos not in enc.completions["chosen"]
    assert enc.completions["rejected"] == ids(tokenizer, " no") + [eos]
    assert report.counts == {"prompt_truncated": 1, "chosen_truncated": 1}

    # keep_start keeps the first tokens; an example that fits is not touched
    enc = Encoder(tokenizer, 11, prompt_truncation="keep_start").encode(pair(LONG, " yes", " no"), DataReport("t"))
    assert enc.prompt_ids == full[:8]
    report = DataReport("train")
    enc = Encoder(tokenizer, 35).encode(pair(LONG, " yes", " no"), report)
    assert enc.prompt_ids == full and not report.counts


def test_keep_end_keeps_a_leading_bos(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.bos_token = "<|endoftext|>"
    bos = tok.bos_token_id
    prompt = "<|endoftext|>" + LONG
    full = ids(tok, prompt)
    assert full[0] == bos and len(full) == 33
    enc = Encoder(tok, 11).encode(pair(prompt, " yes", " no"), DataReport("train"))
    assert enc.prompt_ids == [bos] + full[-7:]


def test_explicit_max_prompt_length_still_caps_the_prompt(tokenizer):
    full = ids(tokenizer, LONG)
    enc = Encoder(tokenizer, 64, max_prompt_length=6).encode(pair(LONG, " yes", " no"), DataReport("train"))
    assert enc.prompt_ids == full[-6:]  # fits in 64, but the cap applies


def test_pair_made_identical_by_truncation_is_dropped_and_counted(tokenizer, tmp_path, caplog):
    shared = " one two three four five six seven eight"
    records = [{"prompt": "Count:", "chosen": shared + " nine", "rejected": shared + " ten"},
               {"prompt": "Hi", "chosen": " yes", "rejected": " no"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    train, _ = prepare_datasets(DataConfig(max_length=12), tokenizer, "paired", train_source=str(path))
    report = train.report
    assert [str(e.origin) for e in train.examples] == [f"{path}:2"]
    assert (report.records, report.examples, dict(report.dropped), dict(report.rejected)) == (
        2, 1, {"identical_after_truncation": 1}, {})
    # the truncation counts describe the examples kept: the dropped pair's cuts are not in them
    assert report.summary() == ("train: 2 records (plain) -> 1 examples; truncated: none; "
                                "dropped 1: 1 chosen == rejected after truncation")
    with pytest.raises(ExampleDropped):
        Encoder(tokenizer, 12).encode(pair("Count:", shared + " nine", shared + " ten"), DataReport("t"))

    # strict keeps it (counted), as before
    strict, _ = prepare_datasets(DataConfig(max_length=12, truncation="strict"), tokenizer, "paired",
                                 train_source=str(path))
    assert strict.report.examples == 2 and strict.report.counts["pairs_identical_after_truncation"] == 1

    # the one line printed, and data_report.json
    caplog.set_level(logging.INFO, logger="prefopt")
    write_reports(tmp_path / "out", [report])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data train")]
    assert lines == ["data " + report.summary()] and "\n" not in lines[0]
    (saved,) = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert (saved["records"], saved["examples"], saved["dropped"], saved["rejected"]) == (
        2, 1, {"identical_after_truncation": 1}, {})
    assert strict.report.as_dict()["chosen_truncated"] == strict.report.as_dict()["rejected_truncated"] == 1


# ---------------------------------------------------------------------------- the strict switch
def test_strict_makes_a_prompt_that_does_not_fit_a_bad_record(tokenizer, demo_records, tmp_path):
    path = tmp_path / "demo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo_records[:20]))
    full = {e.origin.line: e for e in prepare_datasets(DataConfig(max_length=1 << 20), tokenizer, "paired",
                                                        train_source=str(path))[0].examples}
    first = min(n for n, e in full.items() if len(e.prompt_ids) >= 128)
    with pytest.raises(DataError) as err:
        prepare_datasets(DataConfig(max_length=128, truncation="strict"), tokenizer, "paired", train_source=str(path))
    n = len(full[first].prompt_ids)
    assert str(err.value) == (f"{path}:{first}: the prompt has {n} tokens, leaving no room for a completion "
                              f"within data.max_length=128 (data.truncation: strict); data.truncation: auto cuts "
                              f"long prompts to fit, data.max_prompt_length caps them (set data.on_error: skip "
                              f"to skip such records)")
    skip, _ = prepare_datasets(DataConfig(max_length=128, truncation="strict", on_error="skip"), tokenizer, "paired",
                               train_source=str(path))
    too_long = sum(len(e.prompt_ids) >= 128 for e in full.values())
    assert dict(skip.report.rejected) == {"too_long": too_long} and skip.report.examples == 20 - too_long
    assert not skip.report.counts["prompt_truncated"]  # nothing cut silently: only completions, counted
    # the default cuts that same record's prompt to fit
    auto, _ = prepare_datasets(DataConfig(max_length=128), tokenizer, "paired", train_source=str(path))
    cut = next(e for e in auto.examples if e.origin.line == first)
    assert cut.prompt_ids == full[first].prompt_ids[-len(cut.prompt_ids):] and 64 <= len(cut.prompt_ids) < 128


def test_truncation_setting_is_in_the_cache_key_and_checked(tokenizer, demo_records):
    key = {mode: cache_key(DataConfig(truncation=mode), tokenizer, "paired", (demo_records[:2], None), 0,
                           ((), (), ())) for mode in ("auto", "strict")}
    assert key["auto"] and key["auto"] != key["strict"]
    with pytest.raises(ConfigError, match="data.truncation must be one of auto, strict"):
        Encoder(tokenizer, 64, truncation="lenient")


# ---------------------------------------------------------------------------- TRL's other layouts
def test_text_records_are_language_modelling_data(tokenizer, demo_records, tmp_path):
    texts = [r["chosen"]["value"] for r in demo_records[:6]]
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train, _ = prepare_datasets(DataConfig(max_length=4096), tokenizer, "completion", train_source=str(path))
    assert train.report.format == "text" and train.report.examples == 6
    eos = tokenizer.eos_token_id
    for text, e in zip(texts, train.examples):
        # no BOS here: the first token (which nothing predicts) is the prompt, every other one is learned
        assert e.prompt_ids + e.completions["completion"] == tokenizer(text)["input_ids"] + [eos]
        assert len(e.prompt_ids) == 1
    # a tokenizer that adds a BOS: the BOS is the prompt, every text token is learned
    tok = copy.deepcopy(tokenizer)
    from tokenizers.processors import TemplateProcessing
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.convert_tokens_to_ids("<|endoftext|>"))])
    tok.bos_token = "<|endoftext|>"
    e = Encoder(tok, 4096).encode(load_examples(str(path), DataConfig(), DataReport("t"))[0], DataReport("t"))
    assert e.prompt_ids == [tok.bos_token_id] and e.completions["completion"] == ids(tok, texts[0]) + [eos]
    # long texts are cut from the end, like any completion
    short, _ = prepare_datasets(DataConfig(max_length=32), tokenizer, "completion", train_source=str(path))
    assert all(len(e.prompt_ids) + len(e.completions["completion"]) <= 32 for e in short.examples)
    assert short.report.summary().startswith("train: 6 records (text) -> 6 examples; truncated: 6 completions")
    # a preference loss has nothing to compare
    with pytest.raises(ConfigError) as err:
        prepare_datasets(DataConfig(), tokenizer, "paired", train_source=str(path))
    assert str(err.value) == (f"{path}:1: the data format 'text' is plain text for language modelling (SFT: "
                              f"`prefopt sft`); the loss needs paired data (chosen and rejected)")


def test_implicit_prompt_layouts(tmp_path):
    plain = [{"chosen": "Q: What colour is the sky?\nA: blue", "rejected": "Q: What colour is the sky?\nA: black"},
             {"chosen": "Say hi. hello there", "rejected": "Say hi. go away"}]
    report = DataReport("train")
    examples = load_examples(plain, DataConfig(), report)
    assert report.format == "plain_implicit"
    # the common start up to its last whitespace: "bl" of blue/black stays in the completions
    assert [(e.prompt, e.chosen, e.rejected) for e in examples] == [
        ("Q: What colour is the sky?\nA:", " blue", " black"), ("Say hi.", " hello there", " go away")]
    with pytest.raises(DataError, match=r"<list> record 1: \[plain_implicit\] chosen and rejected share no prompt"):
        load_examples([{"chosen": "yes", "rejected": "no"}], DataConfig(), DataReport("train"))
    # HH dialogues stay hh (split at the last "\n\nAssistant:"), message lists conversational_implicit
    hh = [{"chosen": "\n\nHuman: hi\n\nAssistant: Sure, A", "rejected": "\n\nHuman: hi\n\nAssistant: Sure, B"}]
    report = DataReport("train")
    (ex,) = load_examples(hh, DataConfig(), report)
    assert report.format == "hh" and (ex.chosen, ex.rejected) == (" Sure, A", " Sure, B")
    conv = [{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}]
    report = DataReport("train")
    (ex,) = load_examples(conv, DataConfig(), report)
    assert report.format == "conversational_implicit" and ex.prompt == [{"role": "user", "content": "hi"}]


# ---------------------------------------------------------------------------- end to end
def test_dpo_trains_at_max_length_128_on_demo_data(tiny_model_dir, demo_records, tmp_path):
    from prefopt import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path), max_length=128, max_steps=2, per_device_train_batch_size=4,
                     logging_steps=1, progress_bar=False)
    DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:20], args=args).train()
    (report,) = json.loads((tmp_path / "data_report.json").read_text())
    assert (report["records"], report["examples"], report["dropped"], report["rejected"]) == (20, 20, {}, {})
    assert report["prompt_truncated"] >= 15  # record 18's 1,400-token prompt among them
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)


def test_prefopt_sft_trains_on_a_text_file(tiny_model_dir, demo_records, tmp_path):
    from prefopt.cli import main

    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": r["chosen"]["value"]}) + "\n" for r in demo_records[:8]))
    out = tmp_path / "out"
    assert main(["sft", f"model.name_or_path={tiny_model_dir}", f"data.train={path}", f"output_dir={out}",
                 "data.max_length=64", "train.max_steps=2", "train.per_device_train_batch_size=4",
                 "train.logging_steps=1", "train.progress_bar=false"]) == 0
    (report,) = json.loads((out / "data_report.json").read_text())
    assert (report["format"], report["examples"]) == ("text", 8)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
