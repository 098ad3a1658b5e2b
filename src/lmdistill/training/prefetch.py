"""The next step's micro-batches, built while the current step runs.

Building a step's batches is host work: reading the blocks' tokens out of the memory-mapped
store, padding them, and across tokenizers the teacher's tokens of the same text and the aligned
positions (``data/alignment.py``, numpy). ``Prefetcher`` does it for step s + 1 on one background
thread while step s runs on the device, and on a CUDA device copies the batches into pinned
(page-locked) memory there too, so that the step's ``Batch.to(device, non_blocking=True)`` is an
asynchronous copy the device orders before the forward that reads it.

The batches are the ones the data cursor names, built by the same function in the same order
(one worker thread, so the sampler is never asked from two threads at once): a run with the
prefetcher trains on exactly the batches one without it would (tested), and a resumed run picks
the cursor up where the checkpoint left it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from lmdistill.core.batch import Batch


class Prefetcher:
    """``take(cursor)``: the micro-batches at data cursor ``cursor`` (``make(cursor)``), then the
    next ``per_step`` cursors' batches are started in the background. A cursor other than the
    one prefetched (a first step, a resume) is built on the spot."""

    def __init__(self, make: Callable[[int], list[Batch]], per_step: int, pin: bool):
        self.make, self.per_step, self.pin = make, per_step, pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmdistill-prefetch")
        self._ahead: tuple[int, Future] | None = None

    def take(self, cursor: int) -> list[Batch]:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == cursor:
            batches = ahead[1].result()  # (an error building them is raised here, in the step)
        else:
            if ahead is not None:
                ahead[1].cancel()
            batches = self._build(cursor)
        self._ahead = (cursor + self.per_step, self._pool.submit(self._build, cursor + self.per_step))
        return batches

    def _build(self, cursor: int) -> list[Batch]:
        batches = self.make(cursor)
        return [batch.pin_memory() for batch in batches] if self.pin else batches

    def close(self) -> None:
        """Stop: the batches being built are finished and dropped; nothing else is started."""
        self._ahead = None
        self._pool.shutdown(wait=True, cancel_futures=True)
