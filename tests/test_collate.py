"""The collators' exact tensors (the same ones their docstrings show)."""
import pytest
import torch

from prefopt.data.collate import PaddedCollator, make_collator
from prefopt.data.roles import expand_roles
from prefopt.data.schema import Origin
from prefopt.data.tokenize import EncodedExample

O = Origin("t", 0)


def test_docstring_example_exact_tensors():
    ex = EncodedExample([11, 12], {"chosen": [21, 22, 2], "rejected": [31, 2]}, O)
    b = PaddedCollator(0, ("chosen", "rejected"))([ex])
    assert b.input_ids.tolist() == [[11, 12, 21, 22, 2], [11, 12, 31, 2, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b.token_row.tolist() == [0, 0, 0, 1, 1]
    assert b.token_pos.tolist() == [1, 2, 3, 1, 2]
    assert b.token_target.tolist() == [21, 22, 2, 31, 2]
    assert b.token_sequence.tolist() == [0, 0, 0, 1, 1]
    assert b.sequence_lengths.tolist() == [3, 2]
    assert {k: v.tolist() for k, v in b.index.items()} == {"chosen": [0], "rejected": [1]}
    assert b.labels is None and b.extras == {} and b.num_examples == 1 and b.num_tokens == 9


def test_two_pairs_role_major_with_padding_multiple_and_extras():
    a = EncodedExample([1], {"chosen": [2, 3], "rejected": [4]}, O, extras={"preference_prob": 0.8})
    b = EncodedExample([5, 6], {"chosen": [7], "rejected": [8, 9]}, O, extras={"preference_prob": 0.6})
    batch = PaddedCollator(0, ("chosen", "rejected"), pad_to_multiple_of=4, extras=("preference_prob",))([a, b])
    assert batch.input_ids.tolist() == [[1, 2, 3, 0], [5, 6, 7, 0], [1, 4, 0, 0], [5, 6, 8, 9]]
    assert batch.token_row.tolist() == [0, 0, 1, 2, 3, 3]
    assert batch.token_pos.tolist() == [0, 1, 1, 0, 1, 2]
    assert batch.token_target.tolist() == [2, 3, 7, 4, 8, 9]
    assert batch.token_sequence.tolist() == [0, 0, 1, 2, 3, 3]
    assert batch.index["chosen"].tolist() == [0, 1] and batch.index["rejected"].tolist() == [2, 3]
    assert torch.allclose(batch.extras["preference_prob"], torch.tensor([0.8, 0.6]))


def test_unpaired_with_kl_mismatched_pairs():
    a = EncodedExample([1, 2], {"completion": [3, 9]}, O, label=True)
    b = EncodedExample([4], {"completion": [5, 6, 9]}, O, label=False)
    batch = PaddedCollator(0, ("completion", "kl"))(expand_roles([a, b], ("completion", "kl")))
    # kl rows: prompt i with the completion of example (i + 1) mod N in dataset order
    assert batch.input_ids.tolist() == [[1, 2, 3, 9, 0], [4, 5, 6, 9, 0], [1, 2, 5, 6, 9], [4, 3, 9, 0, 0]]
    assert batch.index["completion"].tolist() == [0, 1] and batch.index["kl"].tolist() == [2, 3]
    assert batch.labels.tolist() == [True, False]
    assert batch.sequence_lengths.tolist() == [2, 3, 3, 2]


def test_shared_layout_docstring_exact_tensors():
    ex = EncodedExample([11, 12], {"chosen": [21, 22, 2], "rejected": [31, 2]}, O)
    b = make_collator("shared", 0, ("chosen", "rejected"))([ex])
    assert b.input_ids.tolist() == [[11, 12, 21, 22, 2, 31, 2]]
    att = b.attention
    assert att.padding.tolist() == [[1] * 7] and att.segment.tolist() == [[0] * 7]
    assert att.branch.tolist() == [[0, 0, 1, 1, 1, 2, 2]]
    assert att.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3]]
    assert b.token_row.tolist() == [0, 0, 0, 0, 0]
    assert b.token_pos.tolist() == [1, 2, 3, 1, 5]
    assert b.token_target.tolist() == [21, 22, 2, 31, 2]
    assert b.token_sequence.tolist() == [0, 0, 0, 1, 1] and b.sequence_lengths.tolist() == [3, 2]
    assert {k: v.tolist() for k, v in b.index.items()} == {"chosen": [0], "rejected": [1]}
    assert b.num_tokens == 7 and att.units == [[(0, 2, (3, 2))]]


def test_packed_rows_fill_first_fit_decreasing_within_the_longest_unit():
    a = EncodedExample([1, 2], {"chosen": [3, 4, 5, 6], "rejected": [7]}, O)   # units of 6 and 3 tokens
    b = EncodedExample([8], {"chosen": [9, 10], "rejected": [11, 12]}, O)     # units of 3 and 3
    batch = make_collator("packed", 0, ("chosen", "rejected"))([a, b])
    # budget 6 (the longest unit); longest first, ties in sequence order (a.chosen, b.chosen,
    # a.rejected, b.rejected): [a.chosen], [b.chosen + a.rejected], [b.rejected]
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [8, 9, 10, 1, 2, 7], [8, 11, 12, 0, 0, 0]]
    att = batch.attention
    assert att.branch is None and att.units == [[(0, 6, ())], [(0, 3, ()), (3, 3, ())], [(0, 3, ())]]
    assert att.segment.tolist() == [[0] * 6, [0, 0, 0, 1, 1, 1], [0, 0, 0, -1, -1, -1]]
    assert att.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2]]
    # sequences numbered role-major (a.chosen, b.chosen, a.rejected, b.rejected), tokens in order
    assert batch.token_sequence.tolist() == [0, 0, 0, 0, 1, 1, 2, 3, 3]
    assert batch.token_row.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    assert batch.token_pos.tolist() == [1, 2, 3, 4, 0, 1, 4, 0, 1]
    assert batch.token_target.tolist() == [3, 4, 5, 6, 9, 10, 7, 11, 12]
    assert batch.num_tokens == 15 and batch.input_ids.numel() == 18  # batch_fill 15/18


def test_equal_completions_of_an_example_share_one_sequence():
    ex = EncodedExample([1], {"chosen": [2, 3], "rejected": [4]}, O)
    roles = ("chosen", "rejected", "ref_completion")
    for layout in ("padded", "packed", "shared"):
        batch = make_collator(layout, 0, roles)(expand_roles([ex], roles))
        assert batch.num_sequences == 2 and batch.index["ref_completion"].tolist() == batch.index["chosen"].tolist()
