"""The prefetcher: each step gets exactly the batches its data cursor names, the next step's are
built on the background thread while the step runs, a cursor it did not expect (a resume) is built
on the spot, and an error building batches reaches the step that needs them."""

from __future__ import annotations

import threading

import pytest
import torch

from lmdistill.core.batch import Batch
from lmdistill.training.prefetch import Prefetcher


class Recorder:
    """``make``: two micro-batches per cursor whose ids spell the cursor, and which thread built them."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple[int, str]] = []
        self.fail_at = fail_at
        self.started = threading.Event()

    def __call__(self, cursor: int) -> list[Batch]:
        self.calls.append((cursor, threading.current_thread().name))
        if cursor == self.fail_at:
            raise RuntimeError(f"block store unreadable at {cursor}")
        return [Batch.from_blocks(torch.full((1, 4), cursor + i)) for i in range(2)]


def test_each_step_gets_its_cursor_s_batches_and_the_next_are_built_in_the_background():
    make = Recorder()
    prefetch = Prefetcher(make, per_step=2, pin=False)
    try:
        for cursor in (0, 2, 4, 6):
            batches = prefetch.take(cursor)
            assert [int(b.input_ids[0, 0]) for b in batches] == [cursor, cursor + 1]
    finally:
        prefetch.close()
    built_by = dict(make.calls)
    # every step's (and the one after the last, unless closing cancelled it before it began)
    assert sorted(built_by)[:4] == [0, 2, 4, 6] and set(built_by) <= {0, 2, 4, 6, 8}
    assert built_by[0] == threading.current_thread().name  # the first step: nothing was ahead
    assert all(built_by[c].startswith("lmdistill-prefetch") for c in built_by if c)


def test_a_cursor_other_than_the_prefetched_one_is_built_on_the_spot():
    make = Recorder()
    prefetch = Prefetcher(make, per_step=1, pin=False)
    try:
        prefetch.take(0)
        batches = prefetch.take(7)  # a resume: not the 1 that was built ahead
        assert int(batches[0].input_ids[0, 0]) == 7
        assert (7, threading.current_thread().name) in make.calls
        assert int(prefetch.take(8)[0].input_ids[0, 0]) == 8
    finally:
        prefetch.close()


def test_an_error_building_the_next_batches_is_raised_by_the_step_that_takes_them():
    prefetch = Prefetcher(Recorder(fail_at=3), per_step=3, pin=False)
    try:
        prefetch.take(0)  # starts cursor 3 in the background, which fails
        with pytest.raises(RuntimeError, match="unreadable at 3"):
            prefetch.take(3)
    finally:
        prefetch.close()


def test_pinned_batches_are_asked_for_when_pinning(monkeypatch):
    """(This machine's torch has no CUDA to pin for: the call itself is checked.)"""
    pinned = []
    monkeypatch.setattr(Batch, "pin_memory", lambda self: pinned.append(self) or self)
    prefetch = Prefetcher(Recorder(), per_step=2, pin=True)
    try:
        batches = prefetch.take(0)
    finally:
        prefetch.close()
    assert all(any(b is p for p in pinned) for b in batches) and len(pinned) == 4  # this step's and the next's
