"""The offline trainer's data cursor (sft, distill, rft, dpo, reward-model): every item once per
epoch, a function of the step (resume reads the same batches), each process its own share."""

from __future__ import annotations

import pytest

from posttrain.config import ConfigError
from posttrain.offline import micro_batches, steps_per_epoch


def _step(step, n=10, rank=0, processes=1, batch_size=2, grad_accum=2):
    return micro_batches(step, n, batch_size=batch_size, grad_accum=grad_accum,
                         processes=processes, rank=rank, seed=0)  # fmt: skip


def test_cursor_covers_each_epoch_once():
    """10 items, micro 2 x accum 2: 3 steps an epoch, the last one short (2 items)."""
    assert steps_per_epoch(10, 4, 1) == 3
    epoch = [_step(s) for s in range(3)]
    assert [[len(mb) for mb in step] for step in epoch] == [[2, 2], [2, 2], [2]]
    seen = [i for step in epoch for mb in step for i in mb]
    assert sorted(seen) == list(range(10))
    assert _step(4) == _step(4) and _step(0) != _step(3)  # a new order each epoch


def test_processes_share_the_step_of_one():
    """2 processes read, between them, the items 1 process reads with twice the batch; a short
    last step that cannot give each process an item is skipped."""
    one = _step(1, batch_size=4, grad_accum=1)
    two = [_step(1, rank=r, processes=2, batch_size=2, grad_accum=1) for r in (0, 1)]
    assert sorted(i for mbs in two for mb in mbs for i in mb) == sorted(one[0])
    assert steps_per_epoch(9, 4, 2) == 2 and steps_per_epoch(10, 4, 2) == 3
    with pytest.raises(ConfigError, match="fewer than the 2 processes"):
        steps_per_epoch(1, 4, 2)
