"""The contract every emulated device model follows: pure request in, reply out.

A `Device` is data (descriptors, strings) plus `Function`s (one per interface group, like the kernel's
configfs functions: mass storage, HID, CDC-ACM). It never touches a socket, a file descriptor of the edge,
or an event loop. Edges (the USB/IP server, the FunctionFS gadget, replay) call:

- `Device.control(setup, data) -> Reply`: a control transfer on ep0. `data` is the OUT data stage
  (b"" for IN or no-data requests). Chapter-9 standard requests are answered by `Device` itself; class and
  vendor requests go to the `Function` owning the interface (recipient interface) or endpoint.
- `Device.transfer(endpoint, data, length) -> Reply | None`: a bulk or interrupt transfer. `endpoint` is the
  address with its direction bit (0x81 = IN 1, 0x02 = OUT 2). For OUT, `data` is what the host sent; for IN,
  `data` is None and `length` is the host's buffer size. `None` means "nothing to send yet" (a NAK): the edge
  keeps the transfer pending and retries it after the device calls the wake-up callback.
- `Device.set_wakeup(callback)`: the edge's hook; a device calls it (from any thread) when a NAK'd IN
  transfer may now complete (a key was typed, serial bytes arrived).
- `Device.reset()`: USB port reset; `Device.close()`: flush and sync backing stores (called on shutdown).

Replies carry a `TransferStatus`, which the edges map to the kernel's URB status (0, -EPIPE, ...).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class TransferStatus(enum.IntEnum):
    """How a transfer ended, as the negative errno the Linux URB status (and USB/IP's `status`) carries."""

    OK = 0
    STALL = -32  # -EPIPE: the endpoint (or ep0 for this request) is halted
    NO_DEVICE = -108  # -ESHUTDOWN: the device went away
    OVERFLOW = -75  # -EOVERFLOW: babble, the device sent more than the buffer holds
    SHORT = -121  # -EREMOTEIO: short packet with URB_SHORT_NOT_OK
    PROTOCOL = -71  # -EPROTO: bit-stuff / protocol error


@dataclass(frozen=True, slots=True)
class Reply:
    """The outcome of one transfer. `data` is IN data; `actual_length` defaults to len(data) for IN and
    must be set by the model for OUT (bytes it accepted)."""

    status: TransferStatus = TransferStatus.OK
    data: bytes = b""
    actual_length: int | None = None

    @property
    def length(self) -> int:
        return len(self.data) if self.actual_length is None else self.actual_length


STALL = Reply(TransferStatus.STALL)

WakeupCallback = Callable[[], None]
