"""Batches: next-token targets, -100 where a position has nothing to predict, counted on the host."""

from __future__ import annotations

import torch

from lmdistill.core.batch import Batch
from lmdistill.loss.dense import IGNORE_INDEX


def test_packed_blocks_have_a_target_at_every_position():
    blocks = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    batch = Batch.from_blocks(blocks)
    assert batch.targets.tolist() == [[6, 7, 8], [2, 3, 4]]
    assert batch.num_targets == 6 and batch.all_valid
    assert batch.attention_mask is None


def test_padding_and_prompt_positions_get_no_target():
    ids = torch.tensor(
        [
            [0, 0, 3, 1, 4, 2],  # left padding, prompt [3, 1], completion [4, 2]
            [3, 1, 5, 9, 0, 0],
        ]
    )  # prompt [3, 1], completion [5, 9], right padding
    attention = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    completion = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 0, 0]])
    batch = Batch.from_ids(ids, attention, loss_mask=completion)
    # Position i predicts token i + 1: only completion tokens are targets.
    assert batch.targets.tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 2],
        [IGNORE_INDEX, 5, 9, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert batch.num_targets == 4 and not batch.all_valid
    assert ids.tolist()[0] == [0, 0, 3, 1, 4, 2]  # the input ids are not modified
    padded_only = Batch.from_ids(ids, attention)
    assert padded_only.num_targets == int((attention[:, 1:] == 1).sum()) == 7


def test_to_keeps_the_host_count():
    batch = Batch.from_ids(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 0]])).to("cpu")
    assert batch.num_targets == 1 and batch.targets.tolist() == [[2, IGNORE_INDEX]]
