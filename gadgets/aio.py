"""Linux native AIO on FunctionFS endpoint files, with as little Python per transfer as can be.

f_fs queues one USB transfer per AIO request (io_submit returns at once) and completes it when the host has
moved the data; completions are signalled on an eventfd the event loop watches. python-libaio's objects (an
AIOBlock and its iovec array built per transfer, a dict of submitted blocks, a fresh event array per reap)
cost more than the transfer itself when Python runs emulated, so this edge drives the same C library
(libaio, through python-libaio's ctypes declarations of libaio.h) with a fixed set of slots: one iocb each,
prepared once and reused. The bytes of an IN transfer go to the kernel where they are, without a copy.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

IOCB_FLAG_RESFD = 1  # include/uapi/linux/aio_abi.h: signal `resfd` (an eventfd) on completion


def _libaio() -> Any:
    from libaio import libaio  # ctypes declarations over the system's libaio.so.1

    return libaio


class _Slot:
    """One iocb and what must stay alive while the kernel owns it."""

    __slots__ = ("address", "array", "buffer", "callback", "common", "index", "iocb", "keep", "reading", "view")

    def __init__(self, c: Any, index: int, eventfd: int) -> None:
        self.index = index
        self.iocb = c.iocb()
        self.iocb.data = index + 1  # echoed in the completion event (0 would read back as None)
        self.common = self.iocb.u.c  # a view into the iocb: set per transfer without walking the union again
        self.common.flags = IOCB_FLAG_RESFD
        self.common.resfd = eventfd
        self.array = (c.iocb_p * 1)(ctypes.pointer(self.iocb))
        self.buffer = bytearray(0)
        self.view = memoryview(self.buffer)
        self.address = 0  # of `buffer`, which is replaced when too small, never resized
        self.keep: object = None  # the bytes an IN transfer sends from
        self.callback: Callable[[Any, int], None] | None = None
        self.reading = False


class AioQueue:
    """Up to `slots` transfers in flight on any endpoint files, completed through `reap()`.

    `read`/`write` raise OSError when the kernel refuses the transfer (e.g. ESHUTDOWN while the function is
    disabled) or when every slot is taken (EAGAIN). Callbacks run inside `reap()`, in completion order:
    a read's with `(data, status)` (data None on error), a write's with `(None, status)`; status is the
    byte count or -errno.
    """

    def __init__(self, slots: int, eventfd: int) -> None:
        c = self._c = _libaio()
        self._ctx = c.io_context_t()
        c.io_queue_init(slots, ctypes.byref(self._ctx))
        self._events = (c.io_event * slots)()
        self._no_wait = c.timespec(0, 0)
        self._slots = [_Slot(c, i, eventfd) for i in range(slots)]
        self._free = list(reversed(self._slots))
        self._submit = c.io_submit
        self._getevents = c.io_getevents
        self.in_flight = 0

    def _take(self) -> _Slot:
        if not self._free:
            raise BlockingIOError(11, "every AIO slot is in use")
        return self._free.pop()

    def _go(self, slot: _Slot, fd: int, opcode: int, address: int, length: int,
            callback: Callable[[Any, int], None]) -> None:
        iocb = slot.iocb
        iocb.aio_fildes = fd
        iocb.aio_lio_opcode = opcode
        common = slot.common
        common.buf = address
        common.nbytes = length
        slot.callback = callback
        try:
            self._submit(self._ctx, 1, slot.array)
        except OSError:
            slot.callback = slot.keep = None
            self._free.append(slot)
            raise
        self.in_flight += 1

    def read(self, fd: int, size: int, callback: Callable[[bytes | None, int], None]) -> None:
        """Read up to `size` bytes from `fd` (an OUT endpoint file: one USB transfer)."""
        slot = self._take()
        if len(slot.buffer) < size:
            slot.view.release()
            slot.buffer = bytearray(size)
            slot.view = memoryview(slot.buffer)
            slot.address = ctypes.addressof(ctypes.c_char.from_buffer(slot.buffer))
        slot.reading = True
        self._go(slot, fd, self._c.IO_CMD_PREAD, slot.address, size, callback)

    def write(self, fd: int, data: bytes | memoryview, callback: Callable[[None, int], None]) -> None:
        """Write `data` to `fd` (an IN endpoint file: one USB transfer; b"" is a zero-length packet). The
        kernel reads the object's own memory, which is kept alive until the callback: bytes, or a writable
        view (of a bytearray the caller leaves alone until then: a buffer it reuses, no copy per transfer)."""
        if type(data) is memoryview and data and not data.readonly and data.c_contiguous:
            address = ctypes.addressof(ctypes.c_char.from_buffer(data))
        else:
            if type(data) is not bytes:
                data = bytes(data)
            address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
        slot = self._take()
        slot.reading = False
        slot.keep = data
        self._go(slot, fd, self._c.IO_CMD_PWRITE, address, len(data), callback)

    def reap(self) -> int:
        """Run the callbacks of the transfers that have completed (never waits); returns how many."""
        if not self.in_flight:
            return 0
        events = self._events
        count: int = self._getevents(self._ctx, 0, len(events), events, ctypes.byref(self._no_wait))
        if not count:
            return 0
        finished = []
        for i in range(count):
            event = events[i]
            slot = self._slots[event.data - 1]
            res = event.res
            data = slot.view[:res].tobytes() if slot.reading and res >= 0 else None
            finished.append((slot.callback, data, res))
            slot.callback = slot.keep = None
            self._free.append(slot)
        self.in_flight -= count
        for callback, data, res in finished:
            callback(data, res)
        return count

    def close(self) -> None:
        """Release the context: the kernel cancels what is still queued and waits for it (the UDC should
        be unbound first, so f_fs ends every transfer at once)."""
        if self._ctx:
            self._c.io_queue_release(self._ctx)
            self._ctx = self._c.io_context_t()
            self.in_flight = 0
            for slot in self._slots:
                slot.callback = slot.keep = None
            self._free = list(reversed(self._slots))
