"""Peeling a batch of onion layers on two threads.

Nearly all of a peel is one X25519 (about 40 µs of a peel's 48), and libsodium runs it without
the GIL, so a second thread can do one while the relay loop's thread does another. The rest
of a peel (BLAKE3, ChaCha20, the bindings' Python) holds the GIL and does not overlap.
bench/relay.py measures both: (e) each primitive and the whole peel on a 2-thread pool, (c)
the relay with and without the second thread.

The relay loop hands a batch to `peel_all` and waits for it: both threads take layers from
one shared iterator (each `next` is atomic under the GIL), so neither idles while the other
has work, and the results come back in the batch's order. The relay loop waits only for
layers the second thread is still peeling: once every layer is done it goes on, even if the
second thread has not woken up yet (on a busy machine that can take milliseconds; the
thread then finds nothing left). A batch of fewer than PARALLEL_MIN layers is peeled on the
calling thread alone: waking the other thread costs tens of µs. The second thread exists
only when this process may run on two CPUs or more (its affinity, e.g. as set by
`taskset`); with one there is nothing to gain.

Building onions for local applications (runtime/apps.py) is the same kind of work, two
X25519 per hop, and shares the second thread through `map_all`.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from earendil_py.core.relay import Layer

PARALLEL_MIN = 4  # layers in a batch before the second thread is worth waking
T = TypeVar("T")
R = TypeVar("R")


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(slots=True)
class _Batch:
    function: Callable[[Any], Any]
    packets: list[Any]
    layers: list[Any]
    todo: Iterator[int]  # indices into packets, shared by both threads
    left: int  # layers not peeled yet, under `lock`
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)  # set when `left` is 0
    error: BaseException | None = None


class ParallelPeeler:
    """`peel_layer` over batches: on the calling thread alone, or, between `start()` and
    `close()` when `threads` >= 2, on a second thread too."""

    def __init__(self, peel_layer: Callable[[bytes], Layer], *, threads: int) -> None:
        self._peel_layer = peel_layer
        self._batches: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._threads = threads
        self.parallel = False  # the second thread is running

    def start(self) -> None:
        """Start the second thread, if `threads` >= 2 and it is not running."""
        if self._threads >= 2 and not self.parallel:
            threading.Thread(target=self._serve, name="peel", daemon=True).start()
            self.parallel = True

    def peel_all(self, packets: list[bytes]) -> list[Layer]:
        """`peel_layer` of each packet, in order."""
        return self.map_all(self._peel_layer, packets)

    def map_all(self, function: Callable[[T], R], items: list[T]) -> list[R]:
        """`function` of each item, in order, shared with the second thread as `peel_all`
        is. `function` must be safe to call from two threads at once."""
        if not self.parallel or len(items) < PARALLEL_MIN:
            return [function(item) for item in items]
        count = len(items)
        batch = _Batch(function, items, [None] * count, iter(range(count)), count)
        self._batches.put(batch)
        self._work(batch)
        batch.done.wait()  # at once unless the second thread is amid a layer
        if batch.error is not None:
            raise batch.error
        return batch.layers  # every index was taken

    def close(self) -> None:
        """End the second thread; later batches are peeled on the calling thread alone."""
        if self.parallel:
            self.parallel = False
            self._batches.put(None)

    def _work(self, batch: _Batch) -> None:
        function, packets, layers = batch.function, batch.packets, batch.layers
        lock = batch.lock
        for index in batch.todo:
            try:
                layers[index] = function(packets[index])
            except BaseException as exc:  # a bug: raised in the caller, not lost
                batch.error = exc
            with lock:
                batch.left -= 1
                if batch.left == 0:
                    batch.done.set()

    def _serve(self) -> None:
        while (batch := self._batches.get()) is not None:
            self._work(batch)
