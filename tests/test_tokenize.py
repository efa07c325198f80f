"""The Encoder: chat templates, the exact prompt/completion boundary, EOS and truncation.

Expected ids are always computed from the ``tokenizer`` fixture directly (ChatML template,
byte-level BPE with 512 tokens, EOS ``<|im_end|>``, no BOS).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from prefopt.config import DataConfig
from prefopt.data.pipeline import load_examples
from prefopt.data.report import DataReport
from prefopt.data.schema import CompletionExample, Origin, PreferenceExample, RecordProblem
from prefopt.data.tokenize import EncodedExample, Encoder
from prefopt.errors import ConfigError

DEMO_DATA = Path(__file__).resolve().parents[1] / "prefopt" / "demo" / "data" / "dpo_en_demo.json"
ORIGIN = Origin("data.jsonl", 0, 1)
DEFAULT_SYSTEM = "You are Helpful Bot, made by Example Corp."
# A template that injects a default system prompt when the conversation has none
# (like Qwen2's): the case TRL PR #1930 fixed, where completions were rendered on their own
# and so began with the system prompt.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def pair(prompt, chosen, rejected, **extras) -> PreferenceExample:
    return PreferenceExample(prompt, chosen, rejected, ORIGIN, extras)


def with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def demo_examples():
    return load_examples(DEMO_DATA, DataConfig(), DataReport("train"))


# ---------------------------------------------------------------------------- basics
def test_fixture_tokenizer_facts(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token is None
    assert ids(tokenizer, "<|im_end|>") == [tokenizer.eos_token_id]
    assert tokenizer("Hi")["input_ids"] == ids(tokenizer, "Hi")  # no special tokens added


def test_exact_ids_of_a_tiny_plain_pair(tokenizer):
    report = DataReport("train")
    enc = Encoder(tokenizer, max_length=64).encode(pair("Hi", " yes", " no", margin=2.0), report)
    eos = tokenizer.eos_token_id
    assert isinstance(enc, EncodedExample)
    assert tokenizer.convert_ids_to_tokens(enc.prompt_ids) == ["H", "i"]
    assert tokenizer.convert_ids_to_tokens(enc.completions["chosen"]) == ["Ġy", "es", "<|im_end|>"]
    assert tokenizer.convert_ids_to_tokens(enc.completions["rejected"]) == ["Ġn", "o", "<|im_end|>"]
    assert enc.prompt_ids == ids(tokenizer, "Hi")
    assert enc.completions == {"chosen": ids(tokenizer, " yes") + [eos], "rejected": ids(tokenizer, " no") + [eos]}
    assert ids(tokenizer, "Hi yes") == enc.prompt_ids + enc.completions["chosen"][:-1]
    assert (enc.origin, enc.label, enc.extras) == (ORIGIN, None, {"margin": 2.0})
    assert not report.counts


def test_unpaired_example_and_ref_completion(tokenizer):
    eos = tokenizer.eos_token_id
    ex = CompletionExample("Hi", " yes", ORIGIN, False, {"ref_completion": " no", "margin": 1.0})
    enc = Encoder(tokenizer, max_length=64).encode(ex, DataReport("train"))
    assert enc.label is False
    assert enc.completions == {"completion": ids(tokenizer, " yes") + [eos],
                               "ref_completion": ids(tokenizer, " no") + [eos]}
    assert enc.extras == {"margin": 1.0}  # ref_completion became a completion, not an extra


# ---------------------------------------------------------------------------- conversational
def test_conversational_ids_match_the_chat_template(tokenizer, demo_examples):
    eos = tokenizer.eos_token_id
    newline = ids(tokenizer, "\n")
    assert len(newline) == 1
    report = DataReport("train")
    encoder = Encoder(tokenizer, max_length=100_000)
    with_system = 0
    for ex in demo_examples[:60]:
        enc = encoder.encode(ex, report)
        prompt_text = tokenizer.apply_chat_template(ex.prompt, add_generation_prompt=True, tokenize=False)
        assert prompt_text.endswith("<|im_start|>assistant\n")
        assert enc.prompt_ids == ids(tokenizer, prompt_text)
        for role in ("chosen", "rejected"):
            full_text = tokenizer.apply_chat_template(ex.prompt + getattr(ex, role), tokenize=False)
            assert full_text.endswith("<|im_end|>\n")
            full_ids = ids(tokenizer, full_text)
            assert full_ids[-2:] == [eos] + newline
            completion = enc.completions[role]
            assert enc.prompt_ids + completion == full_ids[:-1]  # minus the "\n" after <|im_end|>
            assert completion.count(eos) == 1 and completion[-1] == eos
            assert tokenizer.decode(completion) == getattr(ex, role)[0]["content"] + "<|im_end|>"
        with_system += ex.prompt[0]["role"] == "system"
    assert with_system > 0
    assert not report.counts  # no boundary mismatch: the template's special tokens separate them


def test_conversational_demo_data_has_no_boundary_mismatch(tokenizer, demo_examples):
    report = DataReport("train")
    encoder = Encoder(tokenizer, max_length=100_000)
    for ex in demo_examples:
        encoder.encode(ex, report)
    assert report.counts["boundary_mismatch"] == 0 and not report.notes


def test_default_system_prompt_stays_in_the_prompt(tokenizer):
    tok = with_template(tokenizer, DEFAULT_SYSTEM_TEMPLATE)
    eos = tok.eos_token_id
    prompt = [user("What is the capital of France?")]
    answer = "The capital of France is Paris."
    # the naive way (render the completion on its own) would start it with the system prompt
    assert DEFAULT_SYSTEM in tok.apply_chat_template([assistant(answer)], tokenize=False)

    enc = Encoder(tok, max_length=1024).encode(pair(prompt, [assistant(answer)], [assistant("Rome.")]),
                                               DataReport("train"))
    assert DEFAULT_SYSTEM in tok.decode(enc.prompt_ids)
    assert enc.prompt_ids == ids(tok, f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
                                      f"<|im_start|>user\n{prompt[0]['content']}<|im_end|>\n"
                                      f"<|im_start|>assistant\n")
    for role, text in (("chosen", answer), ("rejected", "Rome.")):
        completion = enc.completions[role]
        assert DEFAULT_SYSTEM not in tok.decode(completion)
        assert completion == ids(tok, text) + [eos]


def test_template_that_renders_the_prompt_differently_is_a_record_problem(tokenizer):
    bad = DEFAULT_SYSTEM_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}",
                                          "<|im_start|>bot\n{% endif %}")
    tok = with_template(tokenizer, bad)
    with pytest.raises(RecordProblem) as err:
        Encoder(tok, 1024).encode(pair([user("q")], [assistant("a")], [assistant("b")]), DataReport("train"))
    assert err.value.reason == "template"
    assert str(err.value).startswith("the chat template renders the prompt differently once the completion")


def test_conversational_data_needs_a_chat_template(tokenizer):
    tok = with_template(tokenizer, None)
    with pytest.raises(ConfigError) as err:
        Encoder(tok, 1024).encode(pair([user("q")], [assistant("a")], [assistant("b")]), DataReport("train"))
    assert "model.chat_template" in str(err.value)
    assert str(err.value).startswith("the data is conversational but the tokenizer has no chat template")
    # plain text needs no template
    enc = Encoder(tok, 1024).encode(pair("q", " a", " b"), DataReport("train"))
    assert enc.prompt_ids == ids(tok, "q")


# ---------------------------------------------------------------------------- EOS
def test_plain_completion_gets_exactly_one_eos(tokenizer):
    eos = tokenizer.eos_token_id
    encoder = Encoder(tokenizer, max_length=64)
    report = DataReport("train")
    enc = encoder.encode(pair("Question: hi\n\nAnswer:", " Sure thing", " No"), report)
    assert enc.completions["chosen"] == ids(tokenizer, " Sure thing") + [eos]
    assert enc.completions["rejected"] == ids(tokenizer, " No") + [eos]
    # already ends with EOS: not doubled; whitespace after a final EOS is dropped
    enc = encoder.encode(pair("Q:", " yes<|im_end|>", " no<|im_end|>\n\n"), report)
    assert enc.completions["chosen"] == ids(tokenizer, " yes") + [eos]
    assert enc.completions["rejected"] == ids(tokenizer, " no") + [eos]
    # trailing whitespace without EOS is content: kept, then EOS
    enc = encoder.encode(pair("Q:", " yes\n", " no"), report)
    assert enc.completions["chosen"] == ids(tokenizer, " yes\n") + [eos]
    assert not report.counts


def test_tokenizer_without_eos_is_a_config_error(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.eos_token = None
    with pytest.raises(ConfigError, match="the tokenizer has no EOS token"):
        Encoder(tok, 64)


# ---------------------------------------------------------------------------- boundary mismatch
def test_boundary_mismatch_is_counted_and_completion_tokenised_alone(tokenizer):
    prompt, chosen, rejected = "He", "llo world", " there"
    eos = tokenizer.eos_token_id
    # with this tokenizer "He" + "llo world" merges across the boundary ...
    assert ids(tokenizer, prompt + chosen)[:len(ids(tokenizer, prompt))] != ids(tokenizer, prompt)
    # ... while "He" + " there" does not
    assert ids(tokenizer, prompt + rejected)[:len(ids(tokenizer, prompt))] == ids(tokenizer, prompt)

    report = DataReport("train")
    origin = Origin("data.jsonl", 4, 5)
    enc = Encoder(tokenizer, 64).encode(PreferenceExample(prompt, chosen, rejected, origin), report)
    assert report.counts["boundary_mismatch"] == 1
    assert len(report.notes) == 1
    assert report.notes[0].startswith("prompt/completion boundary mismatch (first at data.jsonl:5): ")
    assert "'He'" in report.notes[0] and "'llo world'" in report.notes[0]
    assert enc.prompt_ids == ids(tokenizer, prompt)
    assert enc.completions["chosen"] == ids(tokenizer, chosen) + [eos]
    assert enc.completions["rejected"] == ids(tokenizer, prompt + rejected)[len(enc.prompt_ids):] + [eos]
    for role in ("chosen", "rejected"):
        full = enc.prompt_ids + enc.completions[role]
        assert full[:len(enc.prompt_ids)] == enc.prompt_ids

    # a second mismatch is counted, the note is not repeated
    Encoder(tokenizer, 64).encode(pair(prompt, chosen, " you"), report)
    assert report.counts["boundary_mismatch"] == 2 and len(report.notes) == 1


# ---------------------------------------------------------------------------- truncation
LONG = "one two three four five six seven eight nine ten eleven twelve"


@pytest.mark.parametrize("truncation", ["keep_end", "keep_start"])
def test_prompt_truncation(tokenizer, truncation):
    full = ids(tokenizer, LONG)
    assert len(full) > 10
    report = DataReport("train")
    enc = Encoder(tokenizer, max_length=20, max_prompt_length=6, prompt_truncation=truncation).encode(
        pair(LONG, " yes", " no"), report)
    assert enc.prompt_ids == (full[-6:] if truncation == "keep_end" else full[:6])
    assert report.counts == {"prompt_truncated": 1}
    # completions are encoded against the whole prompt, then kept whole
    assert enc.completions["chosen"] == ids(tokenizer, " yes") + [tokenizer.eos_token_id]


def test_short_prompt_is_not_truncated(tokenizer):
    report = DataReport("train")
    enc = Encoder(tokenizer, 20, max_prompt_length=6).encode(pair("Hi", " yes", " no"), report)
    assert enc.prompt_ids == ids(tokenizer, "Hi") and not report.counts


def test_completion_truncation(tokenizer):
    eos = tokenizer.eos_token_id
    prompt = "Count:"
    p = ids(tokenizer, prompt)
    max_length = len(p) + 5
    chosen, rejected = " one two three four five six", " seven eight nine ten eleven"
    assert len(ids(tokenizer, prompt + chosen)) > max_length and len(ids(tokenizer, prompt + rejected)) > max_length
    report = DataReport("train")
    # strict: the prompt stays whole (auto would cut it too: tests/test_data_defaults.py)
    enc = Encoder(tokenizer, max_length, truncation="strict").encode(pair(prompt, chosen, rejected), report)
    assert enc.prompt_ids == p
    assert enc.completions["chosen"] == ids(tokenizer, prompt + chosen)[len(p):][:5]
    assert enc.completions["rejected"] == ids(tokenizer, prompt + rejected)[len(p):][:5]
    assert eos not in enc.completions["chosen"]  # a cut completion does not end with EOS
    assert report.counts == {"chosen_truncated": 1, "rejected_truncated": 1}

    # a completion that fits exactly (EOS included) is not cut
    short = " one"
    n = len(ids(tokenizer, prompt + short)) - len(p) + 1
    report = DataReport("train")
    enc = Encoder(tokenizer, len(p) + n, truncation="strict").encode(pair(prompt, short, rejected), report)
    assert enc.completions["chosen"][-1] == eos
    assert report.counts == {"rejected_truncated": 1}


def test_pairs_identical_after_truncation_are_counted_and_kept_under_strict(tokenizer):
    prompt = "Count:"
    p = ids(tokenizer, prompt)
    chosen, rejected = " one two three four five six", " one two three four five seven"
    common = ids(tokenizer, prompt + chosen)[len(p):][:4]
    assert common == ids(tokenizer, prompt + rejected)[len(p):][:4]
    report = DataReport("train")
    enc = Encoder(tokenizer, len(p) + 4, truncation="strict").encode(pair(prompt, chosen, rejected), report)
    assert enc.completions["chosen"] == enc.completions["rejected"] == common
    assert report.counts == {"chosen_truncated": 1, "rejected_truncated": 1,
                             "pairs_identical_after_truncation": 1}


def test_prompt_too_long_without_max_prompt_length_under_strict(tokenizer):
    n = len(ids(tokenizer, LONG))
    with pytest.raises(RecordProblem) as err:
        Encoder(tokenizer, max_length=n, truncation="strict").encode(pair(LONG, " yes", " no"), DataReport("train"))
    assert err.value.reason == "too_long"
    assert str(err.value) == (f"the prompt has {n} tokens, leaving no room for a completion within "
                              f"data.max_length={n} (data.truncation: strict); data.truncation: auto cuts long "
                              f"prompts to fit, data.max_prompt_length caps them")
    # one token of room is enough
    enc = Encoder(tokenizer, max_length=n + 1, truncation="strict").encode(pair(LONG, " yes", " no"),
                                                                           DataReport("train"))
    assert len(enc.completions["chosen"]) == 1


def test_max_prompt_length_must_be_below_max_length(tokenizer):
    with pytest.raises(ConfigError) as err:
        Encoder(tokenizer, max_length=16, max_prompt_length=16)
    assert str(err.value) == "data.max_prompt_length (16) must be smaller than data.max_length (16)"


def test_conversational_prompt_truncation_keeps_the_generation_prompt(tokenizer, demo_examples):
    ex = max(demo_examples[:50], key=lambda e: sum(len(m["content"]) for m in e.prompt))
    prompt_text = tokenizer.apply_chat_template(ex.prompt, add_generation_prompt=True, tokenize=False)
    full = ids(tokenizer, prompt_text)
    assert len(full) > 64
    report = DataReport("train")
    enc = Encoder(tokenizer, 128, max_prompt_length=32).encode(ex, report)
    assert enc.prompt_ids == full[-32:]
    assert tokenizer.decode(enc.prompt_ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert report.counts["prompt_truncated"] == 1
