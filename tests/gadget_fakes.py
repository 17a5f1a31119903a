"""A stand-in for `gadgets.ffs.FunctionFs`, so FunctionFS handlers (the model adapter, the bridge) can be
driven on the host: it records what the handler queues on the endpoint files and lets the test complete it.
It runs `call_soon` callbacks on the test's thread, as the real event loop would on its own; with `loop`
(the bridge's asyncio loop, where its handler lives) every move of the test is made on that loop instead."""

from __future__ import annotations

import concurrent.futures
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from emulator.devices.base import Reply
from emulator.usb.setup import SetupPacket, Speed
from gadgets.ffs import PendingReply


@dataclass
class FakeFfs:
    speed: Speed | None = Speed.HIGH
    enabled: bool = True
    writes: dict[int, list[tuple[bytes, Callable[[int], None]]]] = field(default_factory=dict)
    reads: dict[int, list[tuple[int, Callable[[bytes | None, int], None]]]] = field(default_factory=dict)
    halts: list[int] = field(default_factory=list)
    wakes: int = 0
    stopped: bool = False
    host_addresses: dict[int, int] = field(default_factory=dict)
    host_interfaces: dict[int, int] = field(default_factory=dict)
    handler: Any = None
    calls: queue.Queue[Callable[[], None]] = field(default_factory=queue.Queue)
    loop: Any = None

    # what FunctionFs offers its handler
    def write(self, index: int, data: bytes, callback: Callable[[int], None]) -> bool:
        self.writes.setdefault(index, []).append((bytes(data), callback))
        return True

    def read(self, index: int, size: int, callback: Callable[[bytes | None, int], None]) -> bool:
        self.reads.setdefault(index, []).append((size, callback))
        return True

    def in_flight(self, index: int) -> int:
        return len(self.writes.get(index, [])) + len(self.reads.get(index, []))

    def halt(self, index: int) -> bool:
        self.halts.append(index)
        return True

    def wake(self) -> None:
        self.wakes += 1

    def call_soon(self, fn: Callable[[], None]) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._call_and_pump, fn)
        else:
            self.calls.put(fn)

    def stop(self) -> None:
        self.stopped = True

    # the test's side: play the event loop and the USB host
    def _call_and_pump(self, fn: Callable[[], Any]) -> Any:
        result = fn()
        if self.handler is not None:
            self.handler.pump()
        return result

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """`fn()` (then the handler's pump) where the handler lives, and its result."""
        if self.loop is None:
            return self._call_and_pump(fn)
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def go() -> None:
            try:
                done.set_result(self._call_and_pump(fn))
            except BaseException as exc:
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(go)
        return done.result(10)

    def control(self, setup: SetupPacket, data: bytes = b"", timeout: float = 10.0) -> Reply:
        """A SETUP request as FunctionFs hands it over, and the handler's answer once it has one."""
        answer = self.on_loop(lambda: self.handler.control(setup, data))
        if isinstance(answer, PendingReply):
            self.run_until(lambda: answer.reply is not None, timeout)
            assert answer.reply is not None
            return answer.reply
        assert isinstance(answer, Reply)
        return answer

    def run_calls(self, timeout: float = 0.0) -> int:
        """Run queued callbacks (waiting up to `timeout` for the first), each followed by a pump."""
        done = 0
        deadline = time.monotonic() + timeout
        while True:
            try:
                fn = self.calls.get(timeout=max(0.0, deadline - time.monotonic()) if done == 0 else 0)
            except queue.Empty:
                return done
            fn()
            done += 1
            if self.handler is not None:
                self.handler.pump()

    def run_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not (predicate() if self.loop is None else self.on_loop(predicate)):
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            if self.loop is None:
                self.run_calls(0.05)
            else:
                time.sleep(0.02)

    def complete_write(self, index: int, status: int | None = None) -> bytes:
        def go() -> bytes:
            data, callback = self.writes[index].pop(0)
            callback(len(data) if status is None else status)
            return data

        data: bytes = self.on_loop(go)
        return data

    def deliver(self, index: int, data: bytes) -> int:
        def go() -> int:
            size, callback = self.reads[index].pop(0)
            assert len(data) <= size
            callback(bytes(data), len(data))
            return size

        size: int = self.on_loop(go)
        return size
