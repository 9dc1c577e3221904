"""Read-ahead: decode the regions a consumer has announced while it computes on the last one.

The streaming engine knows every region it will read, in order: the tile plan, with masked
tiles skipped, forward in raster order, backward in reverse. It announces them
(`ReadAhead.expect(boxes)`) and then asks for them one by one; `ReadAhead` keeps up to `depth`
of the next regions reading on background threads, so a region is usually decoded by the
time it is asked for.

Memory bound: at most `depth` regions are held that the consumer has not taken (reading or
read), plus the one it is taking. The consumer may skip announced regions (they are dropped:
a region read ahead and then skipped is wasted work, never a wrong answer) and may ask for
regions it did not announce (read directly, in its own thread). A read that fails in the
background raises the same exception, with its traceback, when that region is asked for.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

from sstream.errors import InputError
from sstream.io.parallel import wait_quietly

__all__ = ["DEFAULT_READ_AHEAD", "ReadAhead"]

Key = TypeVar("Key", bound=Hashable)
Value = TypeVar("Value")

DEFAULT_READ_AHEAD = 2
"""Regions read ahead by default: one decoding while the consumer computes, one queued so a
region that decodes faster than the next computes keeps the decoders busy."""

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_POOL_THREADS = 8  # shared by every ReadAhead; each keeps at most `depth` of them busy


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="sstream-read-ahead")
        return _POOL


class ReadAhead(Generic[Key, Value]):
    """`read(key)` with the announced next keys read ahead on background threads.

    Call it as `read` would be called. `expect(keys)` replaces the announced sequence;
    `close()` (or leaving a `with` block) cancels what has not started and waits for the
    reads in flight, so nothing reads a file its owner is about to close.
    """

    def __init__(self, read: Callable[[Key], Value], depth: int = DEFAULT_READ_AHEAD) -> None:
        if depth < 1:
            raise InputError(f"read-ahead depth must be at least 1, got {depth}")
        self._read, self.depth = read, depth
        self._announced: deque[Key] = deque()             # not yet started
        self._pending: Counter[Key] = Counter()           # the same, for membership
        self._abandoned: list[Future] = []  # taken, then left by an interrupt, still reading
        self._started: deque[tuple[Key, Future]] = deque()  # at most `depth`, in order
        self._lock = threading.Lock()
        self.hits = self.misses = 0  # regions served read ahead / read on demand

    def expect(self, keys: Iterable[Key]) -> None:
        """Announce the keys the next calls will ask for, in order (replacing the last
        announcement), and start reading the first `depth` of them. Reads already started
        for the first keys of the new announcement are kept (an image announced ahead of
        its pass, then by the pass itself)."""
        with self._lock:
            announced = deque(keys)
            kept = 0
            while (kept < len(self._started) and announced
                   and self._started[kept][0] == announced[0]):
                announced.popleft()
                kept += 1
            for _, future in list(self._started)[kept:]:
                future.cancel()
            self._started = deque(list(self._started)[:kept])
            self._announced = announced
            self._pending = Counter(self._announced)
            self._top_up()

    def __call__(self, key: Key) -> Value:
        with self._lock:
            future = self._take(key)
            self._top_up()
        if future is None:
            self.misses += 1
            return self._read(key)
        self.hits += 1
        try:
            return future.result()
        except BaseException:
            if not future.done():  # interrupted while it reads: `close` waits for it too
                with self._lock:
                    self._abandoned.append(future)
            raise

    def held(self) -> int:
        """Regions started and not yet taken (the memory bound: at most `depth`)."""
        with self._lock:
            return len(self._started)

    def close(self) -> None:
        """Forget the announcement and wait for the reads in flight."""
        with self._lock:
            self._announced.clear()
            self._pending.clear()
            started = self._drop_started() + self._abandoned
            self._abandoned = []
        for future in started:
            wait_quietly(future)

    def __enter__(self) -> ReadAhead[Key, Value]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _take(self, key: Key) -> Future | None:
        """The future of `key` if it was started; announced reads before it are dropped."""
        for index, (started_key, _) in enumerate(self._started):
            if started_key == key:
                for _ in range(index):
                    self._started.popleft()[1].cancel()
                return self._started.popleft()[1]
        if self._pending[key] > 0:  # asked for early: skip what came before it
            self._drop_started()
            while self._next_announced() != key:
                pass
        return None

    def _next_announced(self) -> Key:
        key = self._announced.popleft()
        self._pending[key] -= 1
        return key

    def _top_up(self) -> None:
        while self._announced and len(self._started) < self.depth:
            key = self._next_announced()
            self._started.append((key, _pool().submit(self._read, key)))

    def _drop_started(self) -> list[Future]:
        """Cancel the started reads (those already running finish unseen)."""
        dropped = [future for _, future in self._started]
        for future in dropped:
            future.cancel()
        self._started.clear()
        return dropped
