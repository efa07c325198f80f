"""SDPO (Kong et al. 2025, arXiv:2501.01821): multi-turn segments after a shared history.

* the scored-token mask of a 3-turn segment, exact (tiny tokenizer, ChatML), and through the
  padded collator's scored-token list;
* the masked log-prob equals the naive log_softmax().gather() sum over assistant tokens only;
* SDPO on a one-turn segment equals DPO on the same pair (ids and loss values);
* the shared layout encodes the history once; padded == packed == shared for SDPO;
* per-turn mode (segment_turn) and whole dialogues; the masks survive the cache, SFT and KTO roles;
* bad input: file:line messages, counted skips;
* a 2-step training run from the shipped recipe.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from prefopt.config import DataConfig, load_config
from prefopt.data import cache
from prefopt.data.collate import make_collator
from prefopt.data.pipeline import prepare_datasets
from prefopt.data.roles import expand_roles
from prefopt.errors import DataError
from prefopt.logps import score_batch
from prefopt.losses import get_spec
from prefopt.models import build_tiny_model
from prefopt.objective import Objective, Term

from helpers import FrozenReference

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "sdpo.jsonl"
RECIPE = ROOT / "configs" / "losses" / "sdpo.yaml"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


THREE_TURNS = {"history": [user("Hi")],
               "chosen": [assistant("Yes."), user("Why?"), assistant("So.")],
               "rejected": [assistant("No."), user("Ok?"), assistant("Bye.")]}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def encode(tokenizer, records, tmp_path, kind="paired", **cfg):
    path = records if isinstance(records, Path) else write_jsonl(tmp_path / "data.jsonl", records)
    train, _ = prepare_datasets(DataConfig(train=str(path), cache=False, **cfg), tokenizer, kind)
    return train


@pytest.fixture(scope="module")
def models(tokenizer):
    def build(seed):
        model = build_tiny_model(len(tokenizer), hidden_size=32, layers=2, heads=4, kv_heads=2,
                                 intermediate_size=64, max_positions=256, seed=seed)
        return model.eval()
    return build(0), build(1)  # policy, reference


def objective(name: str, ref) -> Objective:
    spec = get_spec(name)
    return Objective([Term(spec, spec.make_params({}), 1.0, name)], FrozenReference(ref))


# ------------------------------------------------------------------ the mask

def test_scored_mask_of_a_three_turn_segment_is_exact(tokenizer, tmp_path):
    data = encode(tokenizer, [THREE_TURNS], tmp_path)
    assert data.report.format == "segment"
    (ex,) = data.examples
    tok = tokenizer.convert_ids_to_tokens
    assert "".join(tok(ex.prompt_ids)) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n".replace(
        "\n", "Ċ")
    chosen, mask = ex.completions["chosen"], ex.scored["chosen"]
    # completion = "Yes.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\nSo.<|im_end|>"
    assert tokenizer.decode(chosen) == ("Yes.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n"
                                        "<|im_start|>assistant\nSo.<|im_end|>")
    assert len(chosen) == 25
    scored = [i for i, m in enumerate(mask) if m]
    # turn 1: "Y" "es" "." <|im_end|> (0-3); then "\n", the user turn and the assistant header (4-20)
    # are context; turn 3: "S" "o" "." <|im_end|> (21-24)
    assert scored == [0, 1, 2, 3, 21, 22, 23, 24]
    assert tokenizer.decode([chosen[i] for i in scored[:4]]) == "Yes.<|im_end|>"
    assert tokenizer.decode([chosen[i] for i in scored[4:]]) == "So.<|im_end|>"
    assert tokenizer.decode(chosen[4:21]) == "\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    assert [i for i, m in enumerate(ex.scored["rejected"]) if m] == [0, 1, 2, 3, 20, 21, 22, 23, 24]
    assert tokenizer.decode([t for t, m in zip(ex.completions["rejected"], ex.scored["rejected"]) if m]) \
        == "No.<|im_end|>Bye.<|im_end|>"

    batch = make_collator("padded", tokenizer.pad_token_id, ("chosen", "rejected"))([ex])
    p = len(ex.prompt_ids)  # 14: the logits at p - 1 + t predict completion token t
    assert p == 14
    assert batch.token_row.tolist() == [0] * 8 + [1] * 9
    assert batch.token_pos.tolist() == [13, 14, 15, 16, 34, 35, 36, 37] + [13, 14, 15, 16, 33, 34, 35, 36, 37]
    assert batch.token_target.tolist() == [chosen[i] for i in scored] + \
        [t for t, m in zip(ex.completions["rejected"], ex.scored["rejected"]) if m]
    assert batch.sequence_lengths.tolist() == [8, 9]
    assert batch.input_ids[0, :p + 25].tolist() == ex.prompt_ids + chosen  # every token is read


def test_masked_log_probs_equal_the_naive_sum_over_assistant_tokens(tokenizer, models, tmp_path):
    policy, _ = models
    (ex,) = encode(tokenizer, [THREE_TURNS], tmp_path).examples
    batch = make_collator("padded", tokenizer.pad_token_id, ("chosen", "rejected"))([ex])
    with torch.no_grad():
        got = score_batch(policy, batch).logps
        for row, role in enumerate(("chosen", "rejected")):
            ids = torch.tensor([ex.prompt_ids + ex.completions[role]])
            logprobs = policy(ids).logits.log_softmax(-1)[0]                  # (T, V)
            p = len(ex.prompt_ids)
            want = sum(logprobs[p - 1 + t, tok] for t, (tok, m) in
                       enumerate(zip(ex.completions[role], ex.scored[role])) if m)
            assert got[row].item() == pytest.approx(want.item(), abs=1e-5)
            everything = sum(logprobs[p - 1 + t, tok] for t, tok in enumerate(ex.completions[role]))
            assert abs(everything.item() - want.item()) > 1  # the user turns would weigh a lot


def test_one_turn_segment_sdpo_equals_dpo(tokenizer, models, tmp_path):
    policy, ref = models
    pair = {"chosen": [assistant("Paris is the capital.")], "rejected": [assistant("I like cheese.")]}
    seg = encode(tokenizer, [{"history": [user("Capital of France?")], **pair}], tmp_path).examples
    conv = encode(tokenizer, [{"prompt": [user("Capital of France?")], **pair}], tmp_path).examples
    assert seg[0].prompt_ids == conv[0].prompt_ids and seg[0].completions == conv[0].completions
    assert all(all(m) for m in seg[0].scored.values())
    losses = {}
    for name, examples in (("sdpo", seg), ("dpo", conv)):
        obj = objective(name, ref)
        batch = make_collator("padded", tokenizer.pad_token_id, obj.roles)(examples)
        with torch.no_grad():
            losses[name] = obj.forward(policy, batch, obj.units(batch)).outputs[name].losses
    assert abs(losses["sdpo"].item() - math.log(2)) > 1e-3  # policy != reference: not the trivial value
    assert losses["sdpo"].item() == pytest.approx(losses["dpo"].item(), abs=1e-6)


# ------------------------------------------------------------------ layouts

def test_shared_layout_encodes_the_history_once(tokenizer):
    data = prepare_datasets(DataConfig(train=str(FIXTURE), cache=False), tokenizer, "paired")[0]
    examples = data.examples[:4]
    history = sum(len(e.prompt_ids) for e in examples)
    completions = sum(len(e.completions["chosen"]) + len(e.completions["rejected"]) for e in examples)
    shared = make_collator("shared", tokenizer.pad_token_id, ("chosen", "rejected"))(examples)
    padded = make_collator("padded", tokenizer.pad_token_id, ("chosen", "rejected"))(examples)
    assert shared.num_tokens == history + completions
    assert padded.num_tokens == 2 * history + completions
    for e in examples:  # the history's ids appear once in the shared rows, then its branches
        row = next(r for r in shared.input_ids.tolist()
                   if any(r[i:i + len(e.prompt_ids)] == e.prompt_ids for i in range(len(r))))
        flat = "," + ",".join(map(str, row)) + ","
        assert flat.count("," + ",".join(map(str, e.prompt_ids)) + ",") == 1
    assert shared.sequence_lengths.tolist() == padded.sequence_lengths.tolist()
    assert shared.sequence_lengths.tolist() == [sum(e.scored[r]) for r in ("chosen", "rejected") for e in examples]


def test_layouts_agree_for_sdpo(tokenizer, models):
    policy, ref = models
    examples = prepare_datasets(DataConfig(train=str(FIXTURE), cache=False), tokenizer, "paired")[0].examples[:5]
    obj = objective("sdpo", ref)
    results = {}
    for layout in ("padded", "packed", "shared"):
        batch = make_collator(layout, tokenizer.pad_token_id, obj.roles)(examples)
        policy.zero_grad()
        step = obj.forward(policy, batch, obj.units(batch))
        step.loss.backward()
        results[layout] = (step.policy.logps.detach(), step.outputs["sdpo"].losses.detach(),
                           torch.cat([p.grad.flatten() for p in policy.parameters()]))
    want_logps, want_loss, want_grad = results["padded"]
    for layout in ("packed", "shared"):
        logps, loss, grad = results[layout]
        assert torch.allclose(logps, want_logps, atol=1e-4, rtol=1e-5), layout
        assert torch.allclose(loss, want_loss, atol=1e-6, rtol=1e-5), layout
        assert torch.allclose(grad, want_grad, atol=1e-6, rtol=1e-3), layout
    policy.zero_grad()


# ------------------------------------------------------------------ modes and plumbing

def test_per_turn_mode_scores_the_diverging_turn_only(tokenizer, tmp_path):
    turn = encode(tokenizer, [THREE_TURNS], tmp_path, format="segment_turn")
    plain = encode(tokenizer, [{"prompt": THREE_TURNS["history"], "chosen": THREE_TURNS["chosen"][:1],
                                "rejected": THREE_TURNS["rejected"][:1]}], tmp_path)
    (t,), (p,) = turn.examples, plain.examples
    assert turn.report.format == "segment_turn" and not t.scored  # one turn each: scored whole
    assert (t.prompt_ids, t.completions) == (p.prompt_ids, p.completions)
    assert tokenizer.decode(t.completions["chosen"]) == "Yes.<|im_end|>"


def test_whole_dialogues_split_at_the_diverging_assistant_turn(tokenizer, tmp_path):
    shared = [user("Hi"), assistant("Hello!"), user("Help?")]
    record = {"chosen": shared + [assistant("Sure."), user("Thanks"), assistant("Welcome.")],
              "rejected": shared + [assistant("No."), user("Please"), assistant("No.")]}
    whole = encode(tokenizer, [record], tmp_path, format="segment").examples[0]
    explicit = encode(tokenizer, [{"history": shared, "chosen": record["chosen"][3:],
                                   "rejected": record["rejected"][3:]}], tmp_path).examples[0]
    assert (whole.prompt_ids, whole.completions, whole.scored) == \
        (explicit.prompt_ids, explicit.completions, explicit.scored)


def test_sharegpt_flavour_and_mask_survive_cache_sft_and_kto_roles(tokenizer, tmp_path):
    gpt = {k: [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in v]
           for k, v in THREE_TURNS.items()}
    (a,) = encode(tokenizer, [gpt], tmp_path).examples
    (b,) = encode(tokenizer, [THREE_TURNS], tmp_path).examples
    assert (a.prompt_ids, a.completions, a.scored) == (b.prompt_ids, b.completions, b.scored)
    back = cache._example(json.loads(json.dumps(cache._example_row(b))))
    assert back.scored == b.scored and back.uid == b.uid
    assert b.uid != type(b)(b.prompt_ids, b.completions, b.origin).uid  # the mask is part of the id
    sft = encode(tokenizer, [THREE_TURNS], tmp_path, kind="completion").examples[0]
    assert sft.scored["completion"] == b.scored["chosen"]
    kto = encode(tokenizer, [THREE_TURNS, {**THREE_TURNS, "history": [user("Yo")]}], tmp_path, kind="unpaired")
    expanded = expand_roles(kto.examples, ("completion", "kl"))
    assert expanded[0].scored["kl"] == kto.examples[1].scored["completion"]


def test_unequal_segments_are_kept_and_counted(tokenizer, tmp_path):
    data = encode(tokenizer, [{**THREE_TURNS, "rejected": [assistant("No.")]}], tmp_path)
    assert len(data.examples) == 1 and data.report.counts["segments_of_unequal_turns"] == 1
    assert "segments_of_unequal_turns" in data.report.notes[0]


# ------------------------------------------------------------------ bad input

BAD = [
    ({**THREE_TURNS, "chosen": [user("Only me.")]}, "no_assistant_turn",
     "[segment] the chosen segment has no assistant turn: nothing in it would be scored (roles: user)"),
    ({**THREE_TURNS, "rejected": [user("Me first."), assistant("Then me.")]}, "wrong_type",
     "[segment] the rejected segment must start with an assistant turn"),
    ({**THREE_TURNS, "history": []}, "empty", "[segment] history is an empty message list"),
    ({**THREE_TURNS, "history": [user("Hi"), assistant("Hello")]}, "wrong_type",
     "[segment] the history ends with an assistant turn"),
    ({**THREE_TURNS, "chosen": [assistant("Yes."), {"role": "robot", "content": "?"}]}, "wrong_type",
     "[segment] chosen[1] has unknown speaker 'robot'"),
]


@pytest.mark.parametrize("record, reason, message", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_segment_records(tokenizer, tmp_path, record, reason, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [THREE_TURNS, record, THREE_TURNS])
    with pytest.raises(DataError) as err:
        encode(tokenizer, path, tmp_path)
    assert str(err.value).startswith(f"{path}:2: {message}")
    data = encode(tokenizer, path, tmp_path, on_error="skip")
    assert len(data.examples) == 2 and dict(data.report.rejected) == {reason: 1}
    assert data.report.rejects[0]["where"] == f"{path}:2"


def test_trailing_user_turns_of_a_segment_are_dropped(tokenizer, tmp_path):
    (a,) = encode(tokenizer, [{**THREE_TURNS, "chosen": THREE_TURNS["chosen"] + [user("Bye")]}], tmp_path).examples
    (b,) = encode(tokenizer, [THREE_TURNS], tmp_path).examples
    assert a.completions == b.completions and a.scored == b.scored


# ------------------------------------------------------------------ end to end

@pytest.mark.parametrize("options", [[], ["reference.strategy=precomputed", "data.layout=padded"]],
                         ids=["as_shipped", "precomputed_reference_padded"])
def test_recipe_trains_two_steps(tiny_model_dir, tmp_path, options):
    from prefopt.trainer import Trainer

    cache_dir = [f"reference.cache_dir={tmp_path / 'ref'}"] if options else []
    config = load_config(RECIPE, [f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path}",
                                  f"data.train={FIXTURE}", "train.max_steps=2", "train.per_device_train_batch_size=4",
                                  "train.gradient_accumulation_steps=1", "train.eval_steps=0", "train.save_steps=0",
                                  "train.logging_steps=1", "train.progress_bar=false", *options, *cache_dir])
    assert [t.name for t in config.loss] == ["sdpo"]
    Trainer.from_config(config).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in train_rows)
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report[0]["format"] == "segment" and report[0]["examples"] == 20
