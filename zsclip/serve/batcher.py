"""Dynamic batching: decoded images from many requests share the image tower's forward passes.

Requests put jobs (the decoded images of one request) on a queue; one model thread takes them off and
runs the tower on up to `max_batch` images at a time. When fewer are waiting, it waits for more, but
only for images already on their way (`coming()`: admitted requests still being decoded), and never
longer than `wait_s` after the oldest waiting image arrived or the model became free, whichever is
later. So a lone request never waits, and under load a batch takes in what the decoders are about
to finish rather than alternating between a large batch and the few images that arrived during it
(on a CPU the image tower costs several times more per image alone than in a batch of 16). A job larger than a batch is split
across batches; a job whose requester has gone (timed out, disconnected) is skipped.

The text tower has a thread of its own (TextWorker), so label classifiers are built beside the
image batches.

No web framework here: a job's result is a concurrent.futures.Future, which asyncio code awaits with
asyncio.wrap_future.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch

    from zsclip.jobs.pipeline import Decoded


GRACE_S = 0.005  # see Batcher._fill


@dataclass
class _Job:
    entries: Sequence["Decoded"]  # readable entries, pixels waiting for the model
    future: Future = field(default_factory=Future)  # -> features [n, D]
    arrived: float = field(default_factory=time.monotonic)
    parts: list = field(default_factory=list)  # (first index, features [k, D]) as batches finish
    done: int = 0  # entries computed so far

    @property
    def abandoned(self) -> bool:
        return self.future.cancelled()


@dataclass
class BatchStats:
    batches: int = 0  # forward passes run
    images: int = 0  # images through the model
    largest: int = 0  # the largest batch so far


class Batcher:
    """One model thread fed by a queue. `encode(entries)` runs the tower: decoded entries -> unit
    features [n, D] (zsclip.jobs.pipeline.encode_batches, as the CLI runs it)."""

    def __init__(
        self,
        encode: Callable[[list["Decoded"]], "torch.Tensor"],
        *,
        max_batch: int,
        wait_s: float,
        coming: Callable[[], int] = lambda: 1,
    ) -> None:
        if max_batch < 1 or wait_s < 0:
            raise ValueError("max_batch must be >= 1 and wait_s >= 0")
        self.encode, self.max_batch, self.wait_s = encode, max_batch, wait_s
        self.coming = coming  # images on their way to `submit`; 0: no use waiting
        self.stats = BatchStats()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="zsclip-model", daemon=True)
        self._started = False
        self._free_since = 0.0  # when the last forward pass ended

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def submit(self, entries: Sequence["Decoded"]) -> Future:
        """Queue readable entries for the model; the future gives their features [n, D], in order.
        Cancel it to drop the entries not yet run."""
        job = _Job(list(entries))
        if not job.entries:
            job.future.set_result(None)
            return job.future
        self._jobs.put(job)
        return job.future

    def close(self) -> None:
        """Finish what is queued, then stop the model thread."""
        if self._started:
            self._jobs.put(None)
            self._thread.join()
            self._started = False

    # -- the model thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        waiting: deque = deque()  # (job, index) of entries not yet run, oldest first
        stopping = False
        while True:
            if not waiting:
                if stopping:
                    return
                job = self._jobs.get()
                if job is None:
                    return
                waiting.extend((job, index) for index in range(len(job.entries)))
            stopping = self._fill(waiting) or stopping
            size = min(self.max_batch, len(waiting))
            batch = [waiting.popleft() for _ in range(size)]
            batch = [(job, index) for job, index in batch if not job.abandoned]
            if batch:
                self._run(batch)
                self._free_since = time.monotonic()

    def _fill(self, waiting: deque) -> bool:
        """Take jobs off the queue until a batch is full, or nothing more is on its way, or the
        oldest waiting image has waited `wait_s`. Returns True when asked to stop meanwhile."""
        # From when the model became free: images that waited through a long batch still get
        # their window, for the company that the decoders are about to deliver.
        deadline = max(waiting[0][0].arrived, self._free_since) + self.wait_s
        # Just after a batch its requesters are being answered, and under load they ask again at
        # once: a short grace lets their next images count as coming.
        grace = self._free_since + min(self.wait_s, GRACE_S)
        while len(waiting) < self.max_batch:
            now = time.monotonic()
            remaining = deadline - now
            wait = remaining > 0 and (self.coming() > 0 or now < grace)
            try:
                if wait:  # in short steps, to see whether anything is still coming
                    job = self._jobs.get(timeout=min(remaining, 0.001))
                else:
                    job = self._jobs.get_nowait()
            except queue.Empty:
                if wait:
                    continue
                return False
            if job is None:
                return True
            waiting.extend((job, index) for index in range(len(job.entries)))
        return False

    def _run(self, batch: list) -> None:
        """One forward pass over the batch; hand each job its rows, and its whole result when done."""
        entries = [job.entries[index] for job, index in batch]
        try:
            features = self.encode(entries)  # [n, D]
        except BaseException as err:  # the model failed: every job in the batch gets the error
            for job in {id(job): job for job, _ in batch}.values():
                _settle(job.future, error=err)
            return
        self.stats.batches += 1
        self.stats.images += len(entries)
        self.stats.largest = max(self.stats.largest, len(entries))
        row = 0
        while row < len(batch):  # consecutive entries of one job arrive together
            job, first = batch[row]
            count = 1
            while row + count < len(batch) and batch[row + count][0] is job:
                count += 1
            job.parts.append((first, features[row : row + count]))
            job.done += count
            row += count
            if job.done == len(job.entries):
                _settle(job.future, result=_joined(job.parts))


def _joined(parts: list) -> "torch.Tensor":
    import torch

    parts.sort(key=lambda part: part[0])
    return torch.cat([features for _, features in parts])  # [n, D]


def _settle(future: Future, *, result=None, error: BaseException | None = None) -> None:
    """Set a future unless its requester cancelled it meanwhile (a race nobody needs to lose)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class TextWorker:
    """One daemon thread for the text tower (label classifiers, text embeddings), in order. A daemon
    so that a classifier still being built when the server stops, its requesters gone (timed out),
    does not hold the process open: it is abandoned, and the cache only ever sees whole files."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="zsclip-text", daemon=True)
        self._thread.start()

    def submit(self, function) -> "Future":
        future: Future = Future()
        self._calls.put((function, future))
        return future

    def close(self) -> None:
        self._calls.put(None)

    def _loop(self) -> None:
        while (call := self._calls.get()) is not None:
            function, future = call
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function())
                except BaseException as err:
                    future.set_exception(err)
