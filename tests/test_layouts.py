"""Equivalence of the fast paths with the plain one (fp32, tight tolerances):

* per-sequence and per-token log-probs: padded == packed == shared, for Llama, Qwen2 and
  GPT-2 shapes, SDPA and eager attention, one or several units per row;
* the LM head on scored positions (fused, chunked or not; logits_to_keep) == full logits, in
  value and gradient, including the token-level KL and registered token statistics;
* every registered loss (and the LD-DPO / WPO modifiers): loss values and gradients agree
  between the three layouts, KTO's mismatched rows and TDPO's token-level KL included;
* the mask rule itself, and FlexAttention's mask_mod, against a brute-force definition.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefopt.attention import SPLIT_SDPA, mask_mod, register_split_sdpa
from prefopt.data.collate import make_collator
from prefopt.data.roles import expand_roles
from prefopt.data.schema import Origin
from prefopt.data.tokenize import EncodedExample
from prefopt.logps import Scoring, score_batch
from prefopt.losses import list_specs
from prefopt.models import build_tiny_model
from prefopt.objective import Objective, Term

from helpers import FrozenReference, step_in_each_layout

O = Origin("t", 0)
PAIR_ROLES = ("chosen", "rejected")
COLUMNS = {"preference_prob": 0.8, "score_chosen": 3.0, "score_rejected": 1.0, "margin": 0.5}


def random_pairs(n: int = 5, vocab: int = 500, seed: int = 0, extras: bool = False) -> list[EncodedExample]:
    """Pairs of mixed shapes: a one-token completion, a long prompt, equal-length completions."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5, 9), (3, 12, 4), (10, 1, 6), (1, 4, 4), (16, 3, 2), (5, 8, 8)][:n]

    def ids(k):
        return torch.randint(5, vocab, (k,), generator=gen).tolist()

    out = []
    for i, (p, c, r) in enumerate(shapes):
        ex = EncodedExample(ids(p), {"chosen": ids(c), "rejected": ids(r)}, O,
                            extras=dict(COLUMNS) if extras else {})
        if extras and i % 2 == 0:  # SLiC's y_ref on some examples only
            ex.completions["ref_completion"] = ids(3)
        out.append(ex)
    return out


def random_unpaired(n: int = 6, vocab: int = 500, seed: int = 1, labels: bool = True) -> list[EncodedExample]:
    gen = torch.Generator().manual_seed(seed)
    return [EncodedExample(torch.randint(5, vocab, (int(p),), generator=gen).tolist(),
                           {"completion": torch.randint(5, vocab, (int(c),), generator=gen).tolist()}, O,
                           label=(i % 3 != 1) if labels else None)
            for i, (p, c) in enumerate([(4, 6), (9, 2), (2, 7), (6, 6), (3, 1), (8, 4)][:n])]


@pytest.fixture(scope="module")
def models(tokenizer):
    """Tiny random models of three architectures, fp32; GPT-2 with tied embeddings."""
    built = {}
    for arch in ("llama", "qwen2", "gpt2"):
        model = build_tiny_model(len(tokenizer), arch=arch, hidden_size=32, layers=2, heads=4, kv_heads=2,
                                 intermediate_size=64, max_positions=256, seed=3, tie_embeddings=arch == "gpt2")
        model.eval()
        built[arch] = model
    return built


def with_attention(model, impl: str):
    if impl == SPLIT_SDPA:
        register_split_sdpa()
    model.config._attn_implementation = impl
    return model


LAYOUTS = [("packed", None), ("shared", None), ("packed", 64), ("shared", 64)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager", SPLIT_SDPA])
@pytest.mark.parametrize("layout, row_budget", LAYOUTS)
def test_layouts_give_the_same_log_probs(models, arch, impl, layout, row_budget):
    """(prefopt_sdpa gets a placeholder mask that lets every token see every other: only the
    piece-by-piece kernel, reached through the layers' keyword arguments, gives these numbers.)"""
    model = with_attention(models[arch], impl)
    examples = random_pairs(6)
    plain = make_collator("padded", 0, PAIR_ROLES)(examples)
    batch = make_collator(layout, 0, PAIR_ROLES, max_tokens_per_row=row_budget)(examples)
    if row_budget:  # several units share a row
        assert batch.input_ids.shape[0] < len(examples) * (1 if layout == "shared" else 2)
    assert batch.num_tokens < plain.num_tokens if layout == "shared" else batch.num_tokens == plain.num_tokens
    with torch.no_grad():
        want = score_batch(model, plain, Scoring.for_model(model))
        got = score_batch(model, batch, Scoring.for_model(model))
    assert torch.equal(batch.sequence_lengths, plain.sequence_lengths)
    assert torch.allclose(got.token_logps, want.token_logps, atol=2e-5, rtol=0)
    assert torch.allclose(got.logps, want.logps, atol=1e-4, rtol=0)


def test_shared_layout_encodes_each_prompt_once():
    examples = random_pairs(4)
    plain = make_collator("padded", 0, PAIR_ROLES)(examples)
    shared = make_collator("shared", 0, PAIR_ROLES)(examples)
    prompts = sum(len(e.prompt_ids) for e in examples)
    assert plain.num_tokens - shared.num_tokens == prompts  # the second prompt copy is gone


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lm_head_modes_agree_in_value_and_gradient(models, arch):
    model = with_attention(models[arch], "sdpa")
    batch = make_collator("shared", 0, PAIR_ROLES)(random_pairs(5))
    torch.manual_seed(0)
    ref_logprobs = torch.randn(len(batch.token_target), model.config.vocab_size).log_softmax(-1)
    weights = torch.randn(batch.num_sequences)
    results = {}
    for head, chunk in (("full", None), ("scored", None), ("fused", None), ("fused", 7)):
        model.zero_grad()
        scores = score_batch(model, batch, Scoring.for_model(model, head, chunk), ref_token_logprobs=ref_logprobs,
                             token_stats=("wpo_adjusted_logp",))
        ((weights * scores.logps).sum() + 0.1 * scores.seq_kl.sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[(head, chunk)] = (scores, grads)
    want, want_grad = results[("full", None)]
    for key, (got, grad) in results.items():
        assert torch.allclose(got.logps, want.logps, atol=1e-4), key
        assert torch.allclose(got.seq_kl, want.seq_kl, atol=1e-4), key
        assert torch.allclose(got.stats["wpo_adjusted_logp"], want.stats["wpo_adjusted_logp"], atol=1e-4), key
        assert torch.allclose(got.correct, want.correct) and torch.allclose(got.logits_mean, want.logits_mean, atol=1e-5)
        assert torch.allclose(grad, want_grad, atol=1e-5, rtol=1e-4), key
    model.zero_grad()


def test_fused_head_without_gradient_runs_in_cache_sized_chunks(models, monkeypatch):
    """Under no_grad the fused head splits the scored tokens into NO_GRAD_CHUNK_BYTES chunks
    (no recomputation to pay): same log-probs; details=False (a reference) gives zeros for the
    logged-only statistics and the same log-probs."""
    import prefopt.logps as logps_module

    model = with_attention(models["llama"], "sdpa")
    batch = make_collator("shared", 0, PAIR_ROLES)(random_pairs(5))
    with torch.no_grad():
        want = score_batch(model, batch, Scoring.for_model(model, "full"))
        monkeypatch.setattr(logps_module, "NO_GRAD_CHUNK_BYTES", 4 * model.config.vocab_size * 3)  # 3 tokens
        calls = []
        plain = logps_module.token_statistics
        monkeypatch.setattr(logps_module, "token_statistics",
                            lambda logits, *a, **k: calls.append(len(logits)) or plain(logits, *a, **k))
        got = score_batch(model, batch, Scoring.for_model(model, "fused"))
        bare = score_batch(model, batch, Scoring.for_model(model, "fused"), details=False)
    assert torch.allclose(got.logps, want.logps, atol=1e-5) and torch.allclose(bare.logps, want.logps, atol=1e-5)
    assert torch.equal(got.correct, want.correct) and torch.allclose(got.logits_mean, want.logits_mean, atol=1e-5)
    assert not bare.correct.any() and not bare.logits_mean.any()
    assert len(batch.token_target) > 3 and max(calls) == 3 and sum(calls) == 2 * len(batch.token_target)


def test_branch_masks_are_exact_views_of_one_cached_mask():
    """The split SDPA's branch mask: additive (0 / dtype minimum) up to ADDITIVE_MASK_MAX, boolean
    beyond; element (i, c) allowed iff c <= i + prompt, for every shape and dtype."""
    from prefopt.attention import ADDITIVE_MASK_MAX, _branch_mask

    for length, prompt in ((3, 5), (700, 1500), (ADDITIVE_MASK_MAX, 100), (ADDITIVE_MASK_MAX + 5, 10), (4, 2100)):
        for dtype in (torch.float32, torch.bfloat16):
            mask = _branch_mask(length, prompt, torch.device("cpu"), dtype)
            want = torch.ones(length, prompt + length, dtype=torch.bool).tril(prompt)
            assert mask.shape == want.shape
            if max(length, prompt) <= ADDITIVE_MASK_MAX:
                assert mask.dtype == dtype and torch.equal(mask == 0, want)
                assert bool((mask[~want] == torch.finfo(dtype).min).all())
            else:
                assert mask.dtype == torch.bool and torch.equal(mask, want)


def test_fused_head_applies_logit_soft_capping(models):
    """A model whose forward soft-caps its logits (Gemma 2): the fused head applies the same cap."""
    model = with_attention(models["llama"], "sdpa")
    batch = make_collator("padded", 0, PAIR_ROLES)(random_pairs(3))
    with torch.no_grad():
        plain = score_batch(model, batch, Scoring.for_model(model, "full"))
        model.config.final_logit_softcapping = 0.5
        try:
            capped = score_batch(model, batch, Scoring.for_model(model, "fused"))
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logits = torch.tanh(logits / 0.5) * 0.5
            naive = logits[batch.token_row, batch.token_pos].log_softmax(-1).gather(
                -1, batch.token_target[:, None]).squeeze(-1)
        finally:
            model.config.final_logit_softcapping = None
    assert torch.allclose(capped.token_logps, naive, atol=1e-5)
    assert not torch.allclose(capped.logps, plain.logps)


# ------------------------------------------------------------------- every loss, every layout

def loss_cases():
    # listwise losses (K responses per prompt) agree across layouts in tests/test_listwise.py
    cases = [(spec.name, {}) for spec in list_specs() if spec.data != "listwise"]
    cases += [("dpo", {"ld_alpha": 0.5}), ("ipo", {"wpo": True}), ("kto", {"z0": "zero"})]
    return cases


def objective_and_examples(name: str, options: dict, ref_model):
    spec = next(s for s in list_specs() if s.name == name)
    modifiers = {k: v for k, v in options.items() if k in ("ld_alpha", "wpo")}
    params = spec.make_params({k: v for k, v in options.items() if k not in modifiers})
    objective = Objective([Term(spec, params, 1.0, name, modifiers)], FrozenReference(ref_model))
    if objective.kind == "paired":
        examples = random_pairs(5, extras=True)
    else:
        examples = random_unpaired(6, labels=objective.kind == "unpaired")
    return objective, expand_roles(examples, objective.roles)


@pytest.mark.parametrize("impl", ["sdpa", SPLIT_SDPA])
@pytest.mark.parametrize("name, options", loss_cases(), ids=lambda v: str(v) if isinstance(v, str) else
                         "-".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_every_loss_agrees_across_layouts(models, tiny_model_dir, name, options, impl):
    ref = with_attention(models["llama"], "sdpa")
    policy = with_attention(AutoModelForCausalLM.from_pretrained(tiny_model_dir), impl)  # other weights than ref
    policy.train()
    objective, examples = objective_and_examples(name, options, ref)
    results = step_in_each_layout(policy, objective, examples, name)
    want, want_grad, _, plain = results["padded"]
    assert torch.isfinite(want).all() and want_grad.abs().max() > 0
    for layout in ("packed", "shared"):
        got, grad, _, batch = results[layout]
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), layout
        assert torch.allclose(grad, want_grad, atol=1e-6, rtol=1e-3), layout
    if "kl" in objective.roles:  # the mismatched rows are scored as their own sequences
        assert plain.num_sequences == 2 * len(examples)


# ------------------------------------------------------------------- the mask rule

def brute_force_allowed(batch) -> torch.Tensor:
    """Query i may see key j iff j <= i in the same unit and j is in the prompt or i's own branch."""
    att = batch.attention
    rows, width = batch.input_ids.shape
    out = torch.zeros(rows, width, width, dtype=torch.bool)
    for r in range(rows):
        for i in range(width):
            for j in range(width):
                if i == j:
                    out[r, i, j] = True
                elif j < i and att.segment[r, i] >= 0 and att.segment[r, i] == att.segment[r, j]:
                    b_i = 0 if att.branch is None else att.branch[r, i]
                    b_j = 0 if att.branch is None else att.branch[r, j]
                    out[r, i, j] = b_j == 0 or b_j == b_i
    return out


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_mask_rule_and_flex_mask_mod_match_brute_force(layout):
    from torch.nn.attention.flex_attention import create_mask

    examples = expand_roles(random_unpaired(4), ("completion", "kl"))
    batch = make_collator(layout, 0, ("completion", "kl"), max_tokens_per_row=40)(examples)
    rows, width = batch.input_ids.shape
    expected = brute_force_allowed(batch)
    assert torch.equal(batch.attention.allowed(), expected)
    flex = create_mask(mask_mod(batch), rows, None, width, width, device="cpu")[:, 0]
    assert torch.equal(flex, expected)


def test_every_example_has_a_stable_content_id():
    a, b = random_pairs(2)
    again = dataclasses.replace(a)
    assert a.uid == again.uid and a.uid != b.uid and 0 <= a.uid < 2**63
    changed = dataclasses.replace(a, completions={**a.completions, "chosen": a.completions["chosen"] + [1]})
    assert changed.uid != a.uid
    batch = make_collator("shared", 0, PAIR_ROLES)([a, b])
    assert batch.example_ids.tolist() == [a.uid, b.uid]
