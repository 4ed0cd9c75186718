"""Ordered read-ahead on a small thread pool: image files decoded ahead of the training step.

PIL (zlib, libjpeg) and numpy release the GIL while they work, so a few threads decode in
parallel with the training thread without worker processes (no fork, no pickling, no shared
memory). The *order* of the results is the order the work was submitted in, never the order
threads finish in, so what a stream yields (and hence resume) does not depend on the number of
threads. Nothing here decides *what* to read: the streams submit in the order their sampler
(or manifest) gives and keep their own resume position for the items not yet consumed.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["THREAD_PREFIX", "DecodeAhead", "ordered_map"]

T = TypeVar("T")
R = TypeVar("R")

#: Name prefix of the decode threads (tests check none is left behind).
THREAD_PREFIX = "ucseg-decode"


class DecodeAhead:
    """A bounded FIFO of futures on ``workers`` threads (created at the first `submit`).

    ``submit(tag, fn, *args)`` in consumption order; ``pop()`` returns ``(tag, future)`` of the
    oldest entry (``future.result()`` re-raises the worker's exception, with the file name in
    its message). `clear` drops the queued work (running calls finish, their results are
    ignored); `close` also stops the threads. The pool keeps no reference to its owner, so a
    stream that is garbage-collected still lets its threads end."""

    def __init__(self, workers: int, name: str = THREAD_PREFIX) -> None:
        if workers < 1:
            raise ValueError(f"decode workers must be >= 1 here, got {workers}")
        self.workers = int(workers)
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._items: deque[tuple[Any, Future]] = deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def submit(self, tag: Any, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=self.name)
            self._items.append((tag, self._pool.submit(fn, *args)))

    def pop(self) -> tuple[Any, Future]:
        return self._items.popleft()

    def peek_tag(self) -> Any:
        return self._items[0][0]

    def clear(self) -> None:
        with self._lock:
            for _, fut in self._items:
                fut.cancel()
            self._items.clear()

    def close(self, wait: bool = True) -> None:
        """Drop queued work and stop the threads (``wait``: join them)."""
        self.clear()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close(wait=False)
        except Exception:
            pass


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, *, ahead: int | None = None
                ) -> Iterator[R]:
    """``map(fn, items)`` computed by ``workers`` threads, results in input order, at most
    ``ahead`` (default ``4 * workers``) calls in flight. ``workers <= 0``: the plain map. The
    first failing item (in input order) raises; the rest is cancelled."""
    if workers <= 0:
        yield from map(fn, items)
        return
    depth = max(int(ahead or 4 * workers), 1)
    q = DecodeAhead(workers)
    it = iter(items)
    try:
        exhausted = False
        while True:
            while not exhausted and len(q) < depth:
                try:
                    item = next(it)
                except StopIteration:
                    exhausted = True
                    break
                q.submit(None, fn, item)
            if not len(q):
                return
            _, fut = q.pop()
            yield fut.result()
    finally:
        q.close(wait=True)
