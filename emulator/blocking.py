"""A blocking runtime for the userspace host: the same `RemoteDevice` code, driven by the calling thread.

The host (`emulator.host`) is written as asyncio code over the sans-I/O core. A script that only wants to
read a disk should not pay for an event loop, a loop thread and a hop between threads on every call, so this
module runs that same code without asyncio:

* `BlockingLoop` offers the few loop methods the host uses (`time`, `call_soon`, `call_at`, `call_later`,
  `create_future`) and owns one socket edge (`emulator.host`'s blocking link);
* a `BlockingFuture`'s `await` does not suspend: it runs the loop — ready callbacks, due timers, a
  non-blocking read of the socket, `poll()` when there is nothing to do — until the future is done;
* `BlockingLoop.run(coro)` therefore runs a host coroutine to its end in one `coro.send(None)` (a
  trampoline): `RemoteDevice`, `MassStorage` and everything above them run unchanged, with every timeout,
  unlink and error path they have on asyncio.

Threads: calls from several threads are allowed and run concurrently on one device, leader/follower style.
The lock is held while host code runs and released only inside `poll()`. The first thread that needs to
wait for the socket becomes the leader and reads for everyone; the others wait on a condition until their
future is done or the leader leaves. A thread that submits while the leader sleeps in `poll()` wakes it
through a pipe, so the leader sees new deadlines and sends what was queued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class BlockingRuntimeError(RuntimeError):
    """Host code awaited something only an asyncio event loop can run (a bug, not a device error)."""


class _Io(Protocol):
    """What the loop needs of its socket edge."""

    fd: int

    def read_some(self) -> bool:
        """Read what the socket has, without blocking, and dispatch it; False if there was nothing."""

    def wants_write(self) -> bool:
        """Whether bytes wait for room in the socket."""

    def write_some(self) -> None:
        """Send what waits, as far as the socket takes it, without blocking."""


class Handle:
    """A scheduled callback (`call_soon`, `call_at`); `cancel()` drops it."""

    __slots__ = ("args", "callback", "cancelled")

    def __init__(self, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class BlockingFuture(asyncio.Future[Any]):
    """The result of a URB or an operation. `await future` runs the loop until it is done, then returns its
    result or raises its exception, without suspending the awaiting coroutine.

    An `asyncio.Future` (the C one: done(), result() and set_result() cost no Python frame, and the host's
    code treats it as the futures it knows) bound to a `BlockingLoop`, whose `call_soon` runs its callbacks;
    only waiting differs. Nothing cancels one: a blocking caller is interrupted by exceptions."""

    def __await__(self) -> Generator[Any, None, Any]:
        if not self.done():
            loop = self.get_loop()
            assert isinstance(loop, BlockingLoop)
            loop.run_until_done(self)
        return self.result()
        yield  # never reached: it makes this a generator, as `await` wants

    __iter__ = __await__


class BlockingLoop:
    """The loop of one blocking connection (see the module docstring). `run(coro)` is the entry point."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._turn = threading.Condition(self._lock)
        self._ready: collections.deque[Handle] = collections.deque()
        self._timers: list[tuple[float, int, Handle]] = []
        self._order = itertools.count()
        self._leader: int | None = None
        self._followers = 0
        self._polling = False
        self._io: _Io | None = None
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._poller = select.poll()
        self._poller.register(self._wake_read, select.POLLIN)
        self._watching: tuple[int, int] = (-1, 0)  # the socket's fd and events registered with _poller
        self._closed = False

    # -- what the host uses of an event loop -------------------------------------------------------------

    time = staticmethod(time.monotonic)
    get_debug = staticmethod(bool)  # False, without a Python frame: asyncio.Future asks it on creation

    def create_future(self) -> BlockingFuture:
        return BlockingFuture(loop=self)  # type: ignore[arg-type]

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        """What asyncio.Future reports when it is dropped with an exception nobody retrieved."""
        log.error("%s", context.get("message", "unhandled error in the blocking host"), exc_info=context.get("exception"))

    def call_soon(self, callback: Callable[..., object], *args: Any, context: Any = None) -> Handle:
        handle = Handle(callback, args)
        self._ready.append(handle)
        self._wake_leader()
        return handle

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Handle:
        handle = Handle(callback, args)
        heapq.heappush(self._timers, (when, next(self._order), handle))
        self._wake_leader()
        return handle

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Handle:
        return self.call_at(self.time() + delay, callback, *args)

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds`, serving the connection meanwhile."""
        future = self.create_future()
        self.call_later(seconds, future.set_result, None)
        await future

    # -- running -------------------------------------------------------------------------------------------

    def attach(self, io: _Io | None) -> None:
        """The socket edge this loop reads and writes (None once the connection is over)."""
        self._io = io

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run host coroutine `coro` to its end in this thread and return its value (or raise)."""
        with self._lock:
            try:
                awaited = coro.send(None)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            coro.close()
            raise BlockingRuntimeError(f"host code awaited {awaited!r}, which needs an asyncio event loop")

    def run_until_done(self, future: BlockingFuture) -> None:
        """Serve the connection until `future` is done (called with the lock held, from `run`)."""
        me = threading.get_ident()
        while not future.done():
            if self._leader is None:
                self._leader = me
                try:
                    self._lead(future)
                finally:
                    self._leader = None
                    if self._followers:
                        self._turn.notify_all()  # one of them takes over
            elif self._leader == me:  # re-entered from a callback: run what is ready, then return to it
                self._lead(future)
            else:
                self._followers += 1
                try:
                    self._turn.wait()
                finally:
                    self._followers -= 1

    def _lead(self, future: BlockingFuture) -> None:
        ready = self._ready
        timers = self._timers
        done = future.done
        while not done():
            if ready:
                while ready:
                    handle = ready.popleft()
                    if not handle.cancelled:
                        handle.callback(*handle.args)
                if self._followers:
                    self._turn.notify_all()  # a callback may have finished a follower's future
                continue
            timeout: float | None = None
            if timers:
                now = time.monotonic()
                when, _, handle = timers[0]
                if when <= now or handle.cancelled:  # due ones to `ready`, cancelled ones dropped
                    while timers and (timers[0][0] <= now or timers[0][2].cancelled):
                        handle = heapq.heappop(timers)[2]
                        if not handle.cancelled:
                            ready.append(handle)
                    continue
                timeout = when - now
            io = self._io
            if io is not None:
                if io.read_some():
                    if self._followers:
                        self._turn.notify_all()  # what was read may finish a follower's future
                    continue
                if io.wants_write():
                    io.write_some()
                if done() or ready:
                    continue
            elif timeout is None:
                raise BlockingRuntimeError("waiting for a future nothing can finish (no connection, no timer)")
            self._wait(io, timeout)

    def _wait(self, io: _Io | None, timeout: float | None) -> None:
        """poll() the socket (and the wake-up pipe) with the lock released, so other threads may submit."""
        if self._closed:  # the connection is over: only timers are left
            if timeout is None:
                raise BlockingRuntimeError("waiting for a future nothing can finish (the connection is closed)")
            self._lock.release()
            try:
                time.sleep(timeout)
            finally:
                self._lock.acquire()
            return
        poller = self._poller  # kept from one wait to the next: registered once, changed when needed
        watch = (-1, 0) if io is None else (io.fd, select.POLLIN | (select.POLLOUT if io.wants_write() else 0))
        if watch != self._watching:
            if self._watching[0] >= 0:
                poller.unregister(self._watching[0])
            if watch[0] >= 0:
                poller.register(*watch)
            self._watching = watch
        self._polling = True
        self._lock.release()
        try:
            events = poller.poll(None if timeout is None else max(1, int(timeout * 1000 + 0.999)))
        finally:
            self._lock.acquire()
            self._polling = False
        if any(fd == self._wake_read for fd, _ in events):
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_read, 512)

    def _wake_leader(self) -> None:
        """A thread other than the leader scheduled something while the leader sleeps in poll(): wake it."""
        if self._polling and not self._closed and self._leader != threading.get_ident():
            with contextlib.suppress(BlockingIOError):  # full: wake-ups are waiting already
                os.write(self._wake_write, b"\0")

    def close(self) -> None:
        """The connection is over: release the wake-up pipe (the loop still runs timers and callbacks)."""
        self._io = None
        if not self._closed:
            self._closed = True
            os.close(self._wake_read)
            os.close(self._wake_write)


__all__ = ["BlockingFuture", "BlockingLoop", "BlockingRuntimeError", "Handle"]
