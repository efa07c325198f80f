"""The one log-prob function against the naive log_softmax().gather() over masked positions."""
import torch

from prefopt.data.collate import PaddedCollator
from prefopt.data.schema import Origin
from prefopt.data.tokenize import EncodedExample
from prefopt.logps import score_batch, sequence_scores, token_statistics


def _batch():
    o = Origin("t", 0)
    examples = [EncodedExample([5, 6, 7], {"chosen": [8, 9, 2], "rejected": [10, 2]}, o),
                EncodedExample([5], {"chosen": [11, 2], "rejected": [12, 13, 14, 2]}, o)]
    return PaddedCollator(0, ("chosen", "rejected"))(examples), examples


def naive(logits, examples, roles=("chosen", "rejected")):
    """Sum of log_softmax at completion positions, row by row, with explicit loops."""
    out, row = [], 0
    for role in roles:
        for ex in examples:
            ids = ex.prompt_ids + ex.completions[role]
            lp = logits[row].log_softmax(-1)
            out.append(sum(lp[t - 1, ids[t]] for t in range(len(ex.prompt_ids), len(ids))))
            row += 1
    return torch.stack(out)


def test_token_statistics_match_log_softmax_gather():
    logits = (torch.randn(7, 50) * 5).to(torch.bfloat16)  # the model's dtype; log-softmax in float32
    targets = torch.randint(0, 50, (7,))
    got = token_statistics(logits, targets)
    naive_logprobs = logits.float().log_softmax(-1)
    assert got.logps.dtype == torch.float32
    assert torch.allclose(got.logps, naive_logprobs.gather(-1, targets[:, None]).squeeze(-1), atol=1e-6)
    assert torch.equal(got.correct, (logits.float().argmax(-1) == targets).float())
    assert torch.allclose(got.logit_mean, logits.float().mean(-1))


def test_sequence_logps_match_naive_masked_sum():
    torch.manual_seed(0)
    batch, examples = _batch()
    logits = torch.randn(*batch.input_ids.shape, 20) * 3
    scores = sequence_scores(logits[batch.token_row, batch.token_pos], batch)
    assert torch.allclose(scores.logps, naive(logits, examples), atol=1e-5)
    assert scores.lengths.tolist() == [3, 2, 2, 4]


def test_prompt_and_padding_never_enter():
    torch.manual_seed(0)
    batch, examples = _batch()
    logits = torch.randn(*batch.input_ids.shape, 20)
    base = sequence_scores(logits[batch.token_row, batch.token_pos], batch).logps
    poisoned = logits.clone()
    # Positions that predict a prompt token (t < P-1) or padding: change them wildly.
    for r in range(batch.input_ids.shape[0]):
        ex = examples[r % 2]
        role = "chosen" if r < 2 else "rejected"
        length = len(ex.prompt_ids) + len(ex.completions[role])
        poisoned[r, : len(ex.prompt_ids) - 1] += 100 * torch.randn(len(ex.prompt_ids) - 1, 20)
        poisoned[r, length - 1:] += 100
    again = sequence_scores(poisoned[batch.token_row, batch.token_pos], batch).logps
    assert torch.equal(base, again)


def test_sequence_kl_matches_naive():
    torch.manual_seed(1)
    batch, _ = _batch()
    pol = torch.randn(len(batch.token_row), 20)
    ref = torch.randn(len(batch.token_row), 20).log_softmax(-1)
    scores = sequence_scores(pol, batch, ref_token_logprobs=ref)
    per_token = torch.nn.functional.kl_div(pol.log_softmax(-1), ref, log_target=True, reduction="none").sum(-1)
    expected = torch.zeros(4).index_add(0, batch.token_sequence, per_token)
    assert torch.allclose(scores.seq_kl, expected, atol=1e-5)


def test_score_batch_on_a_real_model_matches_naive(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch, examples = _batch()
    with torch.no_grad():
        scores = score_batch(model, batch)
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(scores.logps, naive(full, examples), atol=1e-4)
    # Right padding must not change a sequence's scores: score the first row alone.
    with torch.no_grad():
        alone = model(input_ids=batch.input_ids[:1, :6]).logits
    assert torch.allclose(scores.logps[0], naive(alone, examples[:1], ("chosen",))[0], atol=1e-4)
