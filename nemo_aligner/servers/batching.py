"""Dynamic batching: gather the items of concurrent requests into micro-batches for one model worker thread.

A server handler calls ``await batcher.submit(items)``; the items of every pending request go into one FIFO queue. A
single worker thread takes the first waiting item, then keeps taking items until it holds ``micro_batch_size`` of
them or ``max_wait_ms`` have passed since it took the first, runs ``process`` on that micro-batch and hands every
request back its own results in its own order. Under load the queue is never empty, so micro-batches fill up without
waiting and throughput grows with the number of concurrent clients; a lone client pays at most ``max_wait_ms`` of
extra latency per micro-batch.

``process`` always runs in the same thread (models and tokenizers are not thread-safe). A request larger than
``micro_batch_size`` is split over several micro-batches (which may also carry other requests' items). An exception
raised by ``process`` fails the requests that had an item in that micro-batch and no other.

The batcher does not depend on a particular asyncio event loop (results travel through
:class:`concurrent.futures.Future`), so one batcher serves any number of loops and also plain threads through
:meth:`DynamicBatcher.submit_sync`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["DynamicBatcher", "BatcherClosedError"]


class BatcherClosedError(RuntimeError):
    """:meth:`DynamicBatcher.submit` was called after :meth:`DynamicBatcher.close`."""


@dataclass
class _Request:
    """The bookkeeping of one submitted request: where its results go and how many are still missing."""

    future: concurrent.futures.Future
    results: list
    remaining: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    def deliver(self, index: int, value: Any) -> None:
        with self.lock:
            if self.future.done():  # failed by another micro-batch, or cancelled by the caller
                return
            self.results[index] = value
            self.remaining -= 1
            if self.remaining == 0:
                _set(self.future, result=self.results)

    def fail(self, error: BaseException) -> None:
        with self.lock:
            _set(self.future, error=error)


def _set(future: concurrent.futures.Future, result: Any = None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:  # cancelled meanwhile (client went away)
        pass


_STOP = object()


class DynamicBatcher:
    """Run ``process`` over micro-batches gathered from concurrent :meth:`submit` calls (see the module docstring).

    Args:
        process: called with a list of ``1..micro_batch_size`` items, in submission order, always from the same
            worker thread; must return a list (or other sequence) with exactly one result per item, in order.
        micro_batch_size: the most items handed to one ``process`` call (>= 1).
        max_wait_ms: how long, in milliseconds, the worker waits for more items after taking the first item of a
            micro-batch (>= 0; 0 = take only what is already queued).

    Counters (read with :meth:`stats`): ``requests`` submitted, ``items`` processed, ``micro_batches`` run,
    ``failed_micro_batches``, ``max_micro_batch`` (largest micro-batch so far), ``queued`` (items waiting now).

    Raises:
        ValueError: ``micro_batch_size < 1`` or ``max_wait_ms < 0``.
    """

    def __init__(self, process: Callable[[list[Any]], list[Any]], micro_batch_size: int, max_wait_ms: float):
        if int(micro_batch_size) < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if float(max_wait_ms) < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.process = process
        self.micro_batch_size = int(micro_batch_size)
        self.max_wait_ms = float(max_wait_ms)
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._counters = {"requests": 0, "items": 0, "micro_batches": 0, "failed_micro_batches": 0, "max_micro_batch": 0}

    # ---- public API ---------------------------------------------------------------------------------------------
    async def submit(self, items: list[Any]) -> list[Any]:
        """Queue ``items`` and wait for their results: a list of ``len(items)`` results, in the order of ``items``.

        An empty list returns ``[]`` without touching the worker. Cancelling the awaiting task drops the request's
        items that have not been processed yet.

        Raises:
            BatcherClosedError: the batcher was closed.
            Exception: whatever ``process`` raised for a micro-batch holding one of these items (also a
                ``ValueError`` when ``process`` returned the wrong number of results).
        """
        return await asyncio.wrap_future(self._enqueue(items))

    def submit_sync(self, items: list[Any], timeout: float | None = None) -> list[Any]:
        """Blocking form of :meth:`submit` for plain threads (never call it from the worker thread itself).

        Raises:
            As :meth:`submit`; ``concurrent.futures.TimeoutError`` after ``timeout`` seconds.
        """
        return self._enqueue(items).result(timeout=timeout)

    def stats(self) -> dict[str, int]:
        """A snapshot of the counters (see the class docstring)."""
        with self._lock:
            out = dict(self._counters)
        out["queued"] = self._queue.qsize()
        return out

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop the worker after the micro-batch it is running; requests still queued fail with
        :class:`BatcherClosedError`. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self._queue.put(_STOP)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._drain(BatcherClosedError("the batcher was closed"))

    # ---- internals ----------------------------------------------------------------------------------------------
    def _enqueue(self, items: list[Any]) -> concurrent.futures.Future:
        items = list(items)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise BatcherClosedError("the batcher was closed")
            self._counters["requests"] += 1
            if not items:
                future.set_result([])
                return future
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dynamic-batcher", daemon=True)
                self._thread.start()
            request = _Request(future, [None] * len(items), len(items))
            for index, item in enumerate(items):
                self._queue.put((request, index, item))
        return future

    def _drain(self, error: BaseException) -> None:
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                return
            if entry is not _STOP:
                entry[0].fail(error)

    def _take(self, block_until: float | None):
        """The next live queue entry, ``_STOP``, or ``None`` once ``block_until`` (monotonic seconds) has passed."""
        while True:
            try:
                if block_until is None:
                    entry = self._queue.get()
                else:
                    remaining = block_until - time.monotonic()
                    entry = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                return None
            if entry is _STOP or not entry[0].future.done():  # skip items of cancelled / already failed requests
                return entry

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._take(None)
            if first is _STOP:
                break
            batch = [first]
            deadline = time.monotonic() + self.max_wait_ms / 1000.0
            while len(batch) < self.micro_batch_size:
                entry = self._take(deadline)
                if entry is None:
                    break
                if entry is _STOP:
                    stop = True
                    break
                batch.append(entry)
            self._run_micro_batch(batch)
        self._drain(BatcherClosedError("the batcher was closed"))

    def _run_micro_batch(self, batch: list) -> None:
        try:
            results = list(self.process([item for _, _, item in batch]))
            if len(results) != len(batch):
                raise ValueError(f"process returned {len(results)} results for a micro-batch of {len(batch)} items")
        except BaseException as error:  # noqa: BLE001 - handed to the waiting requests, the worker keeps running
            with self._lock:
                self._counters["micro_batches"] += 1
                self._counters["failed_micro_batches"] += 1
            for request in {id(r): r for r, _, _ in batch}.values():
                request.fail(error)
            return
        with self._lock:
            self._counters["micro_batches"] += 1
            self._counters["items"] += len(batch)
            self._counters["max_micro_batch"] = max(self._counters["max_micro_batch"], len(batch))
        for (request, index, _), value in zip(batch, results):
            request.deliver(index, value)
