"""The userspace USB/IP host: import a device from a USB/IP server and drive it from Python.

This is what `usbip attach` + vhci-hcd + the USB core do in the kernel, as an asyncio edge over the sans-I/O
`ClientConnection`: `list_devices()` asks for OP_REQ_DEVLIST, `import_device()` sends OP_REQ_IMPORT and
enumerates the device with real GET_DESCRIPTOR requests (the devlist summary is not trusted), and the
returned `RemoteDevice` submits URBs.

Shape of the hot path (performance matters, a disk image moves through here):

* one `asyncio.Protocol` per connection; `data_received` feeds the core and dispatches each RET by seqnum
  to its `Urb`'s future — no reader task, no per-message wake-up of anything but the waiting caller;
* the codec joins each message's header and payload, and every message submitted in one turn of the
  event loop leaves in a single `transport.write` (a command's CBW + data + CSW URBs: one system call);
  TCP_NODELAY, large socket buffers;
* `submit()` returns an `Urb` at once, so callers pipeline as many URBs as they like; its timeout is armed
  at submission, as libusb arms a transfer's, and an expired URB is unlinked (CMD_UNLINK) — the caller then
  sees the server's verdict: RET_UNLINK (cancelled: `TransferTimeout`) or the racing RET_SUBMIT (completed
  after all: its real result, as `usb_start_wait_urb` returns it).

Nothing waits forever: the connection has a connect timeout, every operation a reply timeout, every URB
its own, and an unlink that the server does not answer within `UNLINK_TIMEOUT` declares the connection
dead. When the connection ends (server killed, device unplugged, garbage from the peer), every pending URB
fails with `DeviceGone` naming why.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import os
import socket
import struct
import time
import typing
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from emulator.blocking import BlockingFuture, BlockingLoop
from emulator.errors import VusbError
from emulator.tap import SessionTap, Tap, data_callback, session_tap
from emulator.usb.descriptors import (
    Configuration,
    DeviceDescriptor,
    EndpointDescriptor,
    LanguageDescriptor,
    StringDescriptor,
    parse_configuration,
    parse_string,
)
from emulator.usb.errors import UsbError
from emulator.usb.setup import (
    DescriptorType,
    SetupPacket,
    TransferType,
    clear_halt,
    get_configuration,
    get_descriptor,
    set_configuration,
    set_interface,
)
from emulator.usbip import (
    NEED_DATA,
    ClientConnection,
    CmdSubmit,
    CmdUnlink,
    ConnectionClosed,
    IsoPacketDescriptor,
    OpDevlistReplyExtra,
    OpRepDevlist,
    OpRepImport,
    OpReqDevlist,
    OpReqImport,
    ProtocolError,
    RetSubmit,
    RetUnlink,
    UsbDevice,
)
from emulator.usbip.codec import PlainRet
from emulator.usbip.constants import (
    ECONNRESET,
    ENODEV,
    ENOENT,
    EOVERFLOW,
    EPIPE,
    EREMOTEIO,
    ESHUTDOWN,
    ST_DEV_BUSY,
    ST_DEV_ERR,
    ST_ERROR,
    ST_NA,
    ST_NODEV,
    ST_OK,
    URB_ISO_ASAP,
    USBIP_DIR_IN,
    USBIP_DIR_OUT,
    USBIP_PORT,
    USBIP_URB_DIR_IN,
    LinuxErrno,
    OpStatus,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TIMEOUT: Final = 5.0
"""Seconds a transfer may take unless told otherwise: the kernel's USB_CTRL_GET_TIMEOUT (5000 ms)."""
CONNECT_TIMEOUT: Final = 5.0
"""Seconds to wait for the TCP connection and for the answer to OP_REQ_DEVLIST / OP_REQ_IMPORT."""
UNLINK_TIMEOUT: Final = 2.0
"""Seconds a server gets to answer CMD_UNLINK before the connection is declared dead."""
ETIMEDOUT: Final = 110
"""Linux's ETIMEDOUT, what usb_start_wait_urb() reports for a URB killed by its timeout."""

_SOCKET_BUFFER = 4 << 20
_NO_SETUP = bytes(8)
# Plain ints: `|` with an IntFlag member runs enum.py's Python code, once per URB.
_URB_DIR_IN = int(USBIP_URB_DIR_IN)
_DIR_IN = int(USBIP_DIR_IN)
_DIR_OUT = int(USBIP_DIR_OUT)
_URB_ISO_ASAP = int(URB_ISO_ASAP)
_INT32_MAX = 0x7FFFFFFF  # transfer_buffer_length is an int32 on the wire
_READ_BUFFER = 1 << 20
_HEAD_READ = 512  # bytes read past a payload bound for an `into`: the next headers, little of the next payload
_WRITE_HIGH_WATER = 1 << 20
_CONNECTION_IDS = itertools.count(1)  # a tap's connection ids, unique in the process

# USB 2.0 §11.24.2: SET_FEATURE(PORT_RESET) to a hub port (bmRequestType USB_RT_PORT = class | other).
# stub_rx.c is_reset_device_cmd() turns exactly this request into usb_reset_device().
_PORT_RESET = SetupPacket(0x23, 0x03, 4, 0, 0)

_STATUS_TEXT: Final = {
    0: "success",
    -EPIPE: "stall (endpoint halted)",
    -EOVERFLOW: "babble (the device sent more than the buffer holds)",
    -EREMOTEIO: "short packet (URB_SHORT_NOT_OK)",
    -ECONNRESET: "unlinked",
    -ENOENT: "unlinked",
    -ESHUTDOWN: "device shut down",
    -ENODEV: "no such device",
    -LinuxErrno.EPROTO: "protocol error on the bus (bitstuff, no response)",
    -LinuxErrno.EILSEQ: "CRC mismatch on the bus",
    -LinuxErrno.ETIME: "no response from the device (bus timeout)",
    -LinuxErrno.ENOSR: "host controller buffer underrun",
    -LinuxErrno.ECOMM: "host controller buffer overrun",
    -LinuxErrno.EXDEV: "isochronous transfer only partially completed",
    -LinuxErrno.EINVAL: "invalid URB (the server refused it)",
    -LinuxErrno.EMSGSIZE: "transfer size invalid for the endpoint",
    -ETIMEDOUT: "timed out",
}

_OP_STATUS_TEXT: Final[dict[int, str]] = {
    ST_NA: "the device is not available (ST_NA)",
    ST_DEV_BUSY: "the device is busy: another client has imported it (ST_DEV_BUSY)",
    ST_DEV_ERR: "the device is in an error state (ST_DEV_ERR)",
    ST_NODEV: "no such device is exported (ST_NODEV)",
    ST_ERROR: "the request failed (ST_ERROR)",
}


def status_text(status: int) -> str:
    """A readable name for a URB status (a negative Linux errno), e.g. -32 -> 'stall (endpoint halted)'."""
    text = _STATUS_TEXT.get(status)
    if text is not None:
        return text
    try:
        return f"-{LinuxErrno(-status).name}"
    except ValueError:
        return f"status {status}"


def op_status_text(status: int) -> str:
    """A readable sentence for an op_common status (ST_NODEV, ST_DEV_BUSY, ...)."""
    text = _OP_STATUS_TEXT.get(status)
    if text is not None:
        return text
    try:
        return f"the request failed ({OpStatus(status).name})"
    except ValueError:
        return f"the request failed (status {status})"


# -- errors ------------------------------------------------------------------------------------------------


class HostError(VusbError):
    """Base of every error the userspace host raises on purpose."""


class HostConnectError(HostError):
    """The server could not be reached (refused, unreachable, timed out)."""


class ImportRefused(HostError):
    """The server answered OP_REQ_IMPORT (or OP_REQ_DEVLIST) with a failure status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class DeviceGone(HostError):
    """The connection ended (server gone, closed, or it broke the protocol); every pending URB failed."""


class UnsupportedTransfer(HostError):
    """A transfer the endpoint (or the server) cannot do: wrong transfer type, unknown endpoint."""


class TransferError(HostError):
    """A URB completed with a non-zero status. `status` is the negative Linux errno from RET_SUBMIT, `data`
    whatever IN data came with it, `actual_length` how many bytes moved."""

    def __init__(self, message: str, *, status: int, endpoint: int, actual_length: int = 0,
                 data: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.endpoint = endpoint
        self.actual_length = actual_length
        self.data = data


class StallError(TransferError):
    """The endpoint answered with a STALL (status -EPIPE): halted, or a control request it refuses."""


class TransferTimeout(TransferError):
    """The URB did not complete in time; it was unlinked and the server confirmed the cancellation."""


# -- URBs --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IsoPacketResult:
    """One isochronous packet's outcome: its status and the bytes moved (IN data, or b"" for OUT)."""

    status: int
    actual_length: int
    data: bytes = b""


@dataclass(slots=True, unsafe_hash=True)
class UrbResult:
    """What the server reported for one URB. `unlinked` is True when a CMD_UNLINK cancelled it (then
    `status` is the RET_UNLINK's, normally -ECONNRESET, and no data came back).

    A value, though not frozen: one is made per URB, and a frozen dataclass's `object.__setattr__` per
    field would cost more than decoding the RET_SUBMIT it reports."""

    status: int
    actual_length: int = 0
    data: bytes = b""  # empty if the submit gave `into`: the data is in into[:actual_length]
    unlinked: bool = False
    start_frame: int = 0
    error_count: int = 0
    iso_packets: tuple[IsoPacketResult, ...] = ()


def _silence(future: asyncio.Future[Any]) -> None:
    """Mark a failed future's exception as seen: nobody may be waiting for a URB that failed on close."""
    if not future.cancelled():
        future.exception()


def _run_callback(callback: Callable[[Any], None] | None, owner: object) -> None:
    """Run a URB's or a group's `on_done`: inside the connection's receive path, which must go on."""
    assert callback is not None
    try:
        callback(owner)
    except Exception:
        log.exception("the completion callback of %r failed", owner)


class Urb:
    """One submitted URB: `await urb` (or `await device.wait(urb)`) gives its `UrbResult`.

    Its timeout runs from submission; when it expires the URB is unlinked and `timed_out` is set.
    `on_done(urb)`, if given, runs the moment the URB ends, inside the code that decoded its answer: a
    callback given to the future would wait for the next turn of the event loop (one more epoll per URB).
    """

    __slots__ = ("deadline", "endpoint", "future", "into", "iso_lengths", "length", "on_done", "seqnum",
                 "timed_out", "unlink_seqnum")

    def __init__(self, seqnum: int, endpoint: int, length: int, future: asyncio.Future[UrbResult],
                 iso_lengths: tuple[int, ...] = ()) -> None:
        self.seqnum = seqnum
        self.endpoint = endpoint
        self.length = length
        self.future = future
        self.iso_lengths = iso_lengths
        self.unlink_seqnum: int | None = None
        self.timed_out = False
        self.deadline: float | None = None  # loop time when it is unlinked for taking too long
        self.on_done: Callable[[Urb], None] | None = None
        self.into: memoryview | None = None  # where an IN URB's data goes (submit's `into`)

    @property
    def is_in(self) -> bool:
        return bool(self.endpoint & 0x80)

    def done(self) -> bool:
        return self.future.done()

    def __await__(self) -> Any:
        return self.future.__await__()

    def _finish(self, result: UrbResult) -> None:
        if not self.future.done():
            self.future.set_result(result)
            if self.on_done is not None:
                self._call_back()

    def _fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
            self.future.exception()  # mark it seen: URBs of an abandoned pipeline may never be awaited
            if self.on_done is not None:
                self._call_back()

    def _call_back(self) -> None:
        _run_callback(self.on_done, self)

    def __repr__(self) -> str:
        state = "done" if self.done() else "unlinking" if self.unlink_seqnum else "pending"
        return f"<Urb seqnum={self.seqnum} ep={self.endpoint:#04x} length={self.length} {state}>"


def _plain_length(endpoint: int, data_or_length: bytes | bytearray | memoryview | int,
                  into: memoryview | None) -> int:
    """The length of a URB the core packs without a message object (`ClientConnection.submit_plain`): bulk or
    interrupt IN of a length (`into`, if any, a writable byte view that long) or OUT of immutable bytes, that
    the wire's int32 length can carry; -1 for anything else (`RemoteDevice.submit` checks it the long way)."""
    if type(data_or_length) is int:
        if (0x80 < endpoint <= 0x8F and 0 <= data_or_length <= _INT32_MAX
                and (into is None or (len(into) >= data_or_length and not into.readonly and into.format == "B"))):
            return data_or_length
    elif type(data_or_length) is bytes and 0 < endpoint <= 0x0F and into is None and len(data_or_length) <= _INT32_MAX:
        return len(data_or_length)
    return -1


class UrbGroup:
    """Plain bulk/interrupt URBs submitted together and awaited together (`RemoteDevice.submit_group`): a
    Bulk-Only command's CBW, data and CSW. While every URB ends with status 0 and its full length, no `Urb`,
    future or `UrbResult` is made per URB: the group keeps each answer as the core's tuple (`codec.PlainRet`,
    in `results`) and one future for all. The first URB that ends otherwise (an error, a short transfer), a
    timeout, the connection's end, or a caller asking for `urbs()` turns the group into ordinary `Urb`s — done
    ones with their results, pending ones registered as if submitted alone — so every error is handled by the
    per-URB code, exactly as for URBs submitted one by one. `await group` returns when all URBs ended cleanly
    or the group was turned into `Urb`s (then `clean` is False)."""

    __slots__ = ("_device", "_urbs", "awaited", "clean", "deadline", "future", "lengths", "on_done", "remaining",
                 "results", "seqnums", "transfers")

    def __init__(self, device: RemoteDevice, seqnums: list[int],
                 transfers: tuple[tuple[int, bytes | int, memoryview | None], ...], lengths: list[int],
                 future: asyncio.Future[None]) -> None:
        self._device = device
        self.seqnums = seqnums
        self.transfers = transfers  # as submit_group was given them: (endpoint, data or length, into)
        self.lengths = lengths
        self.future = future
        self.results: list[PlainRet | None] = [None] * len(seqnums)
        self.remaining = len(seqnums)
        self.clean = False  # every URB ended with status 0 and moved its whole length, as a group
        self.awaited = False  # someone waits for it (wait_group): its end is worth a turn of the event loop
        # Runs the moment the group ends (clean, or turned into Urbs), inside the code that decoded the
        # answer, as `Urb.on_done` does: the next commands can be submitted without a task switch.
        self.on_done: Callable[[UrbGroup], None] | None = None
        self.deadline: float | None = None
        self._urbs: list[Urb] | None = None

    def done(self) -> bool:
        return self.future.done()

    def _call_back(self) -> None:
        _run_callback(self.on_done, self)

    def urbs(self) -> list[Urb]:
        """The group as ordinary `Urb`s, in submission order (the group stops being one): to wait for,
        check, unlink or cancel each URB on its own, e.g. after a URB that did not end cleanly."""
        return self._device._ungroup(self)

    def __await__(self) -> Any:
        return self.future.__await__()

    def __repr__(self) -> str:
        state = "clean" if self.clean else "urbs" if self._urbs is not None else "pending"
        return f"<UrbGroup seqnums={self.seqnums} {state}>"


# -- the connection edge -----------------------------------------------------------------------------------


class _LinkCore:
    """What both socket edges of a connection share: the core, the dispatch of its events to `on_event` /
    `on_plain`, the end of the connection to `on_lost` (exactly once), the queue of bytes to send and the
    tap. `_Link` is the asyncio edge, `_BlockingLink` the one `emulator.blocking` drives."""

    def __init__(self, peer: str, tap: Tap | SessionTap | None, loop: Any) -> None:
        self.peer = peer
        self.conn = ClientConnection()
        self.cid = next(_CONNECTION_IDS)
        self._tap = data_callback(tap)  # sees every byte both ways (emulator.tap)
        self._session_tap = session_tap(tap)
        self.on_event: Callable[[object], None] = self._unexpected
        self.on_plain: Callable[[PlainRet], None] | None = None  # plain RET_SUBMITs as tuples, if set
        self.on_lost: Callable[[HostError], None] = lambda error: None
        self.lost: HostError | None = None
        self.closing = False
        self._loop = loop
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._receive = memoryview(bytearray(_READ_BUFFER if self._tap is not None else 0))
        self._fd = -1  # the socket's, read directly with readv (no tap)
        self.group_done = False  # an awaited URB group completed since the read began (RemoteDevice sets it)
        self.closed = loop.create_future()

    def _opened(self, sock: socket.socket | None) -> None:
        """Tune a new connection's socket and tell the session tap about it."""
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            if self._tap is None:
                self._fd = sock.fileno()
        if self._session_tap is not None:
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                self._session_tap.opened(self.cid, sock.getsockname()[:2], sock.getpeername()[:2])
            else:
                self._session_tap = None

    def _ended(self, exc: BaseException | None) -> None:
        """The connection is over (`exc`: why, if it broke): everyone waiting learns it."""
        if exc is not None:
            why = f"the connection to {self.peer} was lost: {exc}"
        elif self.closing:
            why = "the device was closed"
        else:
            why = f"{self.peer} closed the connection (device unplugged or server stopped)"
        self._lost(DeviceGone(why))
        if self._session_tap is not None:
            self._session_tap.closed(self.cid, why)
            self._session_tap = None
        if not self.closed.done():
            self.closed.set_result(None)

    def _received(self, nbytes: int) -> None:
        """`nbytes` arrived: in the core's buffer (or a URB's `into`), or in `_receive` when tapped."""
        if self._tap is None:
            self.conn.buffer_updated(nbytes)
        else:
            self._tap(self.cid, False, bytes(self._receive[:nbytes]))
            self.conn.receive_data(self._receive[:nbytes])
        self._pump()

    def _receive_buffers(self) -> list[memoryview]:
        """Where the next read goes: the core's buffers (a payload's `into`, then `_HEAD_READ` bytes for the
        headers after it), or the tap's copy buffer."""
        if self._tap is None:
            return self.conn.get_buffers(_HEAD_READ if self.conn.reading_into else _READ_BUFFER)
        return [self._receive]

    def _pump(self) -> None:
        conn = self.conn
        on_plain = self.on_plain
        while self.lost is None:
            if on_plain is not None:
                next_plain_ret = conn.next_plain_ret
                plain = next_plain_ret()
                while plain is not None:  # the per-URB path: plain RET_SUBMITs as tuples
                    if plain is NEED_DATA:
                        return
                    on_plain(plain)
                    if self.lost is not None:
                        return
                    plain = next_plain_ret()
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                error = DeviceGone(f"{self.peer} broke the USB/IP protocol: {exc}")
                error.__cause__ = exc
                self.abort(error)
                return
            if event is NEED_DATA:
                return
            if isinstance(event, ConnectionClosed):
                self._lost(DeviceGone(f"{self.peer} closed the connection (device unplugged or server "
                                      "stopped)"))
                return
            self.on_event(event)

    def _unexpected(self, event: object) -> None:  # pragma: no cover - the core only yields expected events
        log.warning("%s: unexpected %r", self.peer, event)

    def _lost(self, error: HostError) -> None:
        if self.lost is None:
            self.lost = error
            self.on_lost(error)

    def send(self, message: Any) -> None:
        """Encode `message` with the core (header and payload in one piece) and queue it. Everything sent
        during one turn of the event loop goes out in one write: the CBW, data and CSW URBs of a command
        cost one system call, not three (on loopback each send also runs the receiver's TCP path)."""
        if self.lost is not None:
            raise self.lost
        self.queue(self.conn.send_iov(message))

    def queue(self, buffers: list[bytes]) -> None:
        """Queue bytes the core produced (header and payload as they are: joined once, in `flush`)."""
        self._out.extend(buffers)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what `send` queued, now."""
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        if self._writable():
            data = out[0] if len(out) == 1 else b"".join(out)
            if self._tap is not None:
                self._tap(self.cid, True, data)
            self._write(data)
        out.clear()

    def _writable(self) -> bool:
        raise NotImplementedError

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def abort(self, error: HostError) -> None:
        """End the connection now because of `error` (which pending work will see)."""
        raise NotImplementedError


class _Link(_LinkCore, asyncio.BufferedProtocol):
    """The asyncio edge of one connection. The kernel reads straight into the core's buffer, or a URB's
    `into` (`BufferedProtocol`), so no bytes object is allocated per read."""

    def __init__(self, peer: str, tap: Tap | SessionTap | None = None) -> None:
        super().__init__(peer, tap, asyncio.get_running_loop())
        self.transport: asyncio.Transport | None = None
        self._paused = False
        self._drained: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self._opened(transport.get_extra_info("socket"))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._receive_buffers()[0]

    def buffer_updated(self, nbytes: int) -> None:
        self._received(nbytes)
        if self._fd >= 0 and self.conn.reading_into:
            self._read_on()
        if self._out:  # what the completions submitted leaves now, not one more turn of the loop later
            self.flush()

    def _read_on(self) -> None:
        """Read on here, until the socket is empty, while URBs with `into` are pending: one readv puts the
        rest of a payload into its `into` and the next headers (`_HEAD_READ` bytes) into the core's buffer,
        so payloads are not copied, and a turn of the event loop still takes all that has arrived. It stops
        early once an awaited URB group completed (`group_done`): its waiter (a pipelined READ) submits the next
        commands, which must not wait until the socket is empty or the server would run dry. The
        transport's own next read sees the end of the stream or an error first reported here is fatal."""
        conn = self.conn
        fd = self._fd
        readv = os.readv
        self.group_done = False
        while self.lost is None and conn.reading_into and not self.group_done:
            try:
                nbytes = readv(fd, conn.get_buffers(_HEAD_READ))
            except BlockingIOError:
                return
            except OSError as exc:
                self.abort(DeviceGone(f"the connection to {self.peer} was lost: {exc}"))
                return
            if not nbytes:
                return  # the end of the stream: the transport's next read reports it
            conn.buffer_updated(nbytes)
            self._pump()
            if self._out:  # what completion callbacks submitted leaves now
                self.flush()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._pump()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- driving -----------------------------------------------------------------------------------------

    def _writable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        self.flush()
        while self._paused and self.lost is None:
            loop = asyncio.get_running_loop()
            if self._drained is None or self._drained.done():
                self._drained = loop.create_future()
            await self._drained
        if self.lost is not None:
            raise self.lost

    def abort(self, error: HostError) -> None:
        self._lost(error)
        if self.transport is not None:
            self.transport.abort()

    async def close(self, timeout: float = 2.0) -> None:
        self.closing = True
        self.flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            if self.transport is not None:
                self.transport.abort()


class _BlockingLink(_LinkCore):
    """The blocking edge of one connection (`emulator.blocking`): a non-blocking socket the loop reads when
    someone waits, and `poll()`s when it has nothing; what the socket does not take at once waits in
    `_pending` and leaves as it drains, while the loop goes on reading (a server blocked writing its answers
    must not stall our writes)."""

    def __init__(self, sock: socket.socket, peer: str, loop: BlockingLoop,
                 tap: Tap | SessionTap | None = None) -> None:
        super().__init__(peer, tap, loop)
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self._pending: collections.deque[memoryview] = collections.deque()
        self._pending_bytes = 0
        self._drained: BlockingFuture | None = None
        self._opened(sock)
        loop.attach(self)

    # -- what the loop calls -------------------------------------------------------------------------------

    def read_some(self) -> bool:
        if self.lost is not None:
            return False
        try:
            if self._fd >= 0:
                nbytes = os.readv(self._fd, self._receive_buffers())
            else:
                nbytes = self.sock.recv_into(self._receive)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._fail(exc)
            return True
        if not nbytes:
            self.conn.receive_data(b"")
            self._pump()
            self._shut(None)
            return True
        self._received(nbytes)
        if self._out:  # what the completions submitted leaves now
            self.flush()
        return True

    def wants_write(self) -> bool:
        return bool(self._pending)

    def write_some(self) -> None:
        pending = self._pending
        while pending:
            try:
                sent = self.sock.send(pending[0])
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(exc)
                return
            self._pending_bytes -= sent
            if sent == len(pending[0]):
                pending.popleft()
            else:
                pending[0] = pending[0][sent:]
        if self._drained is not None and self._pending_bytes <= _WRITE_HIGH_WATER and not self._drained.done():
            self._drained.set_result(None)

    # -- driving -------------------------------------------------------------------------------------------

    def _writable(self) -> bool:
        return self.sock.fileno() >= 0

    def _write(self, data: bytes) -> None:
        self._pending.append(memoryview(data))
        self._pending_bytes += len(data)
        self.write_some()

    async def drain(self) -> None:
        """Wait while more than the high-water mark waits to be sent."""
        self.flush()
        while self._pending_bytes > _WRITE_HIGH_WATER and self.lost is None:
            self._drained = self._loop.create_future()
            await self._drained
        if self.lost is not None:
            raise self.lost

    def _fail(self, exc: OSError) -> None:
        self._lost(DeviceGone(f"the connection to {self.peer} was lost: {exc}"))
        self._shut(exc)

    def _shut(self, exc: BaseException | None) -> None:
        """Close the socket and end the connection (`_ended`), once."""
        if self.sock.fileno() < 0:
            return
        self._loop.close()
        self.sock.close()
        self._fd = -1
        self._pending.clear()
        self._pending_bytes = 0
        self._ended(exc)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def abort(self, error: HostError) -> None:
        self._lost(error)
        self._shut(None)

    async def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (for at most `timeout` seconds), then close."""
        if self.sock.fileno() < 0:
            return
        self.closing = True
        self.flush()
        if self._pending:
            with contextlib.suppress(OSError):
                self.sock.settimeout(timeout)
                for view in self._pending:
                    self.sock.sendall(view)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._shut(None)


class _Batch:
    """`RemoteDevice.batched()`: sends inside leave in one write when the block ends."""

    __slots__ = ("_link", "_scheduled")

    def __init__(self, link: _LinkCore) -> None:
        self._link = link
        self._scheduled = False

    def __enter__(self) -> None:
        link = self._link
        self._scheduled = link._flush_scheduled
        link._flush_scheduled = True  # send() schedules no end-of-turn flush meanwhile

    def __exit__(self, *exc: object) -> None:
        if not self._scheduled:  # otherwise the flush already scheduled writes it
            self._link.flush()


async def _connect(host: str, port: int, timeout: float | None, tap: Tap | SessionTap | None = None) -> _Link:
    loop = asyncio.get_running_loop()
    peer = f"{host}:{port}"
    try:
        _, link = await asyncio.wait_for(loop.create_connection(lambda: _Link(peer, tap), host, port), timeout)
    except TimeoutError:
        raise HostConnectError(f"cannot connect to {peer}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise HostConnectError(f"cannot connect to {peer}: {exc.strerror or exc}") from None
    return link


def _connect_blocking(host: str, port: int, timeout: float | None,
                      tap: Tap | SessionTap | None = None) -> _BlockingLink:
    peer = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout)
    except TimeoutError:
        raise HostConnectError(f"cannot connect to {peer}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise HostConnectError(f"cannot connect to {peer}: {exc.strerror or exc}") from None
    return _BlockingLink(sock, peer, BlockingLoop(), tap)


async def _operation(link: _LinkCore, request: OpReqDevlist | OpReqImport, timeout: float | None) -> object:
    """Send the one operation request of this connection and wait for its reply."""
    loop = link._loop
    reply = loop.create_future()
    reply.add_done_callback(_silence)
    what = "OP_REQ_DEVLIST" if isinstance(request, OpReqDevlist) else "OP_REQ_IMPORT"

    def on_event(event: object) -> None:
        if not reply.done():
            reply.set_result(event)

    def on_lost(error: HostError) -> None:
        if not reply.done():
            failure = DeviceGone(f"no answer to {what}: {error}")
            failure.__cause__ = error.__cause__
            reply.set_exception(failure)

    def expire() -> None:
        if not reply.done():
            reply.set_exception(HostError(f"{link.peer} did not answer {what} within {timeout:g} s"))
            link.abort(DeviceGone(f"{link.peer} did not answer {what} within {timeout:g} s"))

    link.on_event, link.on_lost = on_event, on_lost
    link.send(request)
    timer = None if timeout is None else loop.call_later(timeout, expire)
    try:
        return await reply
    finally:
        if timer is not None:
            timer.cancel()


async def _list_on(link: _Link | _BlockingLink, timeout: float | None) -> tuple[OpDevlistReplyExtra, ...]:
    try:
        reply = await _operation(link, OpReqDevlist(), timeout)
    finally:
        await link.close()
    assert isinstance(reply, OpRepDevlist)
    if reply.status != ST_OK:
        raise ImportRefused(f"{link.peer} refused to list its devices: {op_status_text(reply.status)}",
                            reply.status)
    return reply.devices


async def list_devices(host: str, port: int = USBIP_PORT, *, timeout: float | None = CONNECT_TIMEOUT,
                       tap: Tap | SessionTap | None = None) -> tuple[OpDevlistReplyExtra, ...]:
    """The devices `host` exports (OP_REQ_DEVLIST), as usbipd describes them. `tap` sees the connection
    (`emulator.tap`)."""
    return await _list_on(await _connect(host, port, timeout, tap), timeout)


def list_devices_blocking(host: str, port: int = USBIP_PORT, *, timeout: float | None = CONNECT_TIMEOUT,
                          tap: Tap | SessionTap | None = None) -> tuple[OpDevlistReplyExtra, ...]:
    """`list_devices` in the calling thread, without asyncio (`emulator.blocking`)."""
    link = _connect_blocking(host, port, timeout, tap)
    return typing.cast(BlockingLoop, link._loop).run(_list_on(link, timeout))


async def _import_on(link: _Link | _BlockingLink, busid: str, host: str, port: int,
                     timeout: float | None) -> RemoteDevice:
    try:
        reply = await _operation(link, OpReqImport(busid=busid), timeout)
    except BaseException:
        await link.close()
        raise
    assert isinstance(reply, OpRepImport)
    if reply.status != ST_OK or reply.udev is None:
        await link.close()
        raise ImportRefused(f"cannot import {busid} from {host}:{port}: {op_status_text(reply.status)}",
                            reply.status)
    device = RemoteDevice(link, reply.udev, host=host, port=port)
    try:
        await device.enumerate(timeout=timeout if timeout is not None else DEFAULT_TIMEOUT)
    except BaseException:
        await device.close()
        raise
    log.info("imported %s from %s:%d: %04x:%04x", busid, host, port, device.device_descriptor.id_vendor,
             device.device_descriptor.id_product)
    return device


async def import_device(host: str, busid: str, port: int = USBIP_PORT, *,
                        timeout: float | None = CONNECT_TIMEOUT,
                        tap: Tap | SessionTap | None = None) -> RemoteDevice:
    """Import `busid` from `host` (OP_REQ_IMPORT) and enumerate it; close the result when done (or use
    `async with`). `tap` sees every byte of the connection (`emulator.tap`), e.g. a pcapng recorder's."""
    return await _import_on(await _connect(host, port, timeout, tap), busid, host, port, timeout)


def import_device_blocking(host: str, busid: str, port: int = USBIP_PORT, *,
                           timeout: float | None = CONNECT_TIMEOUT,
                           tap: Tap | SessionTap | None = None) -> RemoteDevice:
    """`import_device` without asyncio: the device runs on the blocking runtime (`emulator.blocking`), so
    its coroutines are run to their end by `device.run(coro)` in the calling thread, with no event loop and
    no loop thread: the fast way for scripts (`emulator.sync_host` wraps it)."""
    link = _connect_blocking(host, port, timeout, tap)
    return typing.cast(BlockingLoop, link._loop).run(_import_on(link, busid, host, port, timeout))


# -- the device --------------------------------------------------------------------------------------------


class RemoteDevice:
    """An imported device: submit URBs, do control/bulk/interrupt/iso transfers, chapter-9 requests.

    Endpoints are addresses with their direction bit (0x81 = IN 1, 0x02 = OUT 2), as in descriptors.
    Must be used from the event loop that imported it.
    """

    def __init__(self, link: _Link | _BlockingLink, udev: UsbDevice, *, host: str = "", port: int = USBIP_PORT) -> None:
        self._link = link
        self.udev = udev
        self.host = host
        self.port = port
        self.busid = udev.busid
        self.devid = udev.devid
        # asyncio's loop (`import_device`) or the blocking runtime's (`import_device_blocking`), which offers
        # the few loop methods used here.
        self._loop = loop = link._loop
        self._new_future: Callable[[], asyncio.Future[UrbResult]] = loop.create_future
        self._time: Callable[[], float] = loop.time
        base = asyncio.BaseEventLoop
        if isinstance(loop, BlockingLoop):
            self._new_future = functools.partial(BlockingFuture, loop=loop)  # type: ignore[arg-type]
        elif isinstance(loop, base):  # create_future() and time() without their Python frames, if asyncio's own
            if type(loop).create_future is base.create_future:
                self._new_future = functools.partial(asyncio.Future, loop=loop)
            if type(loop).time is base.time:
                self._time = time.monotonic
        self._urbs: dict[int, Urb] = {}
        self._grouped: dict[int, tuple[UrbGroup, int]] = {}  # seqnum -> its group and place, see UrbGroup
        self._unlinks: dict[int, Urb] = {}
        self.device_descriptor = DeviceDescriptor()
        self.configurations: tuple[Configuration, ...] = ()
        self.raw_configurations: tuple[bytes, ...] = ()
        self.configuration_value: int | None = None
        self.alternate_settings: dict[int, int] = {}
        self._langids: tuple[int, ...] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_when = 0.0
        self._strings: dict[tuple[int, int], str] = {}
        link.on_event = self._on_event
        link.on_plain = self._on_plain
        link.on_lost = self._on_lost

    def __repr__(self) -> str:
        d = self.device_descriptor
        return f"<RemoteDevice {self.busid} on {self.host}:{self.port} {d.id_vendor:04x}:{d.id_product:04x}>"

    @property
    def speed(self) -> int:
        """enum usb_device_speed as OP_REP_IMPORT reported it."""
        return self.udev.speed

    @property
    def closed(self) -> bool:
        return self._link.lost is not None

    @property
    def pending(self) -> int:
        """URBs submitted and not answered yet."""
        return len(self._urbs) + len(self._grouped)

    # -- dispatch (called by _Link inside data_received) ---------------------------------------------------

    def _on_event(self, event: object) -> None:
        if type(event) is RetSubmit:
            if event.seqnum in self._grouped:  # the message path (e.g. debug logging): as _on_plain
                data = event.transfer_buffer
                group, index = self._grouped[event.seqnum]
                into = group.transfers[index][2]
                if into is not None and data:
                    into[:len(data)] = data
                    data = b""
                self._on_plain((event.seqnum, event.status, event.actual_length, event.start_frame,
                                event.error_count, data))
                return
            urb = self._urbs.pop(event.seqnum, None)
            if urb is None:  # pragma: no cover - the core rejects unknown seqnums first
                return
            isos: tuple[IsoPacketResult, ...] = ()
            if event.iso_packet_descriptors:
                isos = self._iso_results(urb, event)
            data = event.transfer_buffer
            if urb.into is not None and data:  # as next_plain_ret does
                urb.into[:len(data)] = data
                data = b""
            urb._finish(UrbResult(event.status, event.actual_length, data, False,
                                  event.start_frame, event.error_count, isos))  # positional: once per URB
        elif type(event) is RetUnlink:
            urb = self._unlinks.pop(event.seqnum, None)
            # Still pending: this RET_UNLINK finishes it (no RET_SUBMIT follows). Otherwise its RET_SUBMIT
            # already overtook the unlink and the status-0 RET_UNLINK says nothing new.
            if urb is not None and self._urbs.get(urb.seqnum) is urb:
                del self._urbs[urb.seqnum]
                urb._finish(UrbResult(event.status, unlinked=True))

    def _on_plain(self, ret: PlainRet) -> None:
        entry = self._grouped.pop(ret[0], None)
        if entry is not None:
            group, index = entry
            group.results[index] = ret
            if ret[1] or ret[2] != group.lengths[index]:  # not as planned: the URBs take over
                self._ungroup(group)
                return
            group.remaining -= 1
            if not group.remaining and not group.future.done():
                group.clean = True
                group.future.set_result(None)
                if group.awaited:
                    self._link.group_done = True
                if group.on_done is not None:
                    group._call_back()
            return
        urb = self._urbs.pop(ret[0], None)
        if urb is not None:  # else the core rejected it first (pragma: no cover)
            future = urb.future  # urb._finish(), inline: once per URB
            if not future.done():
                future.set_result(UrbResult(ret[1], ret[2], ret[5], False, ret[3], ret[4], ()))
                if urb.on_done is not None:
                    urb._call_back()

    @staticmethod
    def _iso_results(urb: Urb, ret: RetSubmit) -> tuple[IsoPacketResult, ...]:
        data = ret.transfer_buffer
        position = 0
        out = []
        for descriptor in ret.iso_packet_descriptors:
            chunk = b""
            if urb.is_in:  # IN payload: the packets' actual bytes back to back (stub_tx.c strips padding)
                chunk = data[position:position + descriptor.actual_length]
                position += descriptor.actual_length
            out.append(IsoPacketResult(descriptor.status, descriptor.actual_length, chunk))
        return tuple(out)

    def _on_lost(self, error: HostError) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._ungroup_all()
        urbs = list(self._urbs.values())
        self._urbs.clear()
        self._unlinks.clear()
        if urbs:
            log.info("%s: failing %d pending URBs: %s", self.busid, len(urbs), error)
        for urb in urbs:
            urb._fail(error)

    # -- submitting ------------------------------------------------------------------------------------------

    def submit(self, endpoint: int, data_or_length: bytes | bytearray | memoryview | int, *,
               setup: SetupPacket | bytes | None = None, timeout: float | None = DEFAULT_TIMEOUT,
               transfer_flags: int = 0, iso_packets: Sequence[int] | None = None, interval: int = 0,
               on_done: Callable[[Urb], None] | None = None, into: memoryview | None = None) -> Urb:
        """Send one CMD_SUBMIT now and return its `Urb` without waiting.

        `endpoint` is the address with its direction bit (0x00/0x80 for ep0 OUT/IN). IN takes a length,
        OUT the data. `setup` is required on ep0. `iso_packets` (packet lengths) makes it isochronous.
        The timeout starts now; None means no timeout (the URB then ends only with an answer, an unlink,
        or the connection). `on_done(urb)` runs as soon as it ends (see `Urb`).
        `into` (bulk or interrupt IN, a writable byte view of at least the length): the data is put there
        (into[:actual_length]; the result's `data` is then b""), not into a new bytes — read from the
        socket straight into it as it arrives, so it belongs to the URB until the URB ends (a URB that
        fails may leave part of a payload there).
        """
        link = self._link
        if link.lost is not None:
            raise link.lost
        number = endpoint & 0x0F
        length = _plain_length(endpoint, data_or_length, into)
        if length >= 0 and setup is None and iso_packets is None:  # the per-URB path: checked in one test
            conn = link.conn
            seqnum = conn.next_seqnum()
            if endpoint & 0x80:
                out = conn.submit_plain(seqnum, self.devid, _DIR_IN, number, transfer_flags | _URB_DIR_IN, length,
                                        b"", interval, into)
            else:
                out = conn.submit_plain(seqnum, self.devid, _DIR_OUT, number, transfer_flags, length,
                                        data_or_length, interval)  # type: ignore[arg-type]
            link.queue(out)
            return self._register(seqnum, endpoint, length, (), on_done, into, timeout)
        if endpoint & 0x70:
            raise UnsupportedTransfer(f"endpoint address {endpoint:#04x} has reserved bits set")
        direction = USBIP_DIR_IN if endpoint & 0x80 else USBIP_DIR_OUT
        payload: bytes | memoryview = b""
        if isinstance(data_or_length, int):
            if direction == USBIP_DIR_OUT and data_or_length:
                raise UnsupportedTransfer(f"OUT endpoint {endpoint:#04x} takes data, not a length")
            if data_or_length < 0:
                raise UnsupportedTransfer(f"transfer length {data_or_length} is negative")
            length = data_or_length
        else:
            if direction == USBIP_DIR_IN:
                raise UnsupportedTransfer(f"IN endpoint {endpoint:#04x} takes a length, not data")
            # Immutable buffers are sent as they are; a mutable one is copied now, as the caller may reuse
            # it before the bytes leave (at the end of this turn of the loop).
            if isinstance(data_or_length, bytes):
                payload = data_or_length
            elif isinstance(data_or_length, memoryview) and data_or_length.readonly \
                    and data_or_length.c_contiguous:
                payload = data_or_length.cast("B") if data_or_length.format != "B" else data_or_length
            else:
                payload = bytes(data_or_length)
            length = len(payload)
        if number == 0:
            if setup is None:
                raise UnsupportedTransfer("a control transfer on ep0 needs a SETUP packet")
            setup_bytes = setup.to_bytes() if isinstance(setup, SetupPacket) else bytes(setup)
        else:
            if setup is not None:
                raise UnsupportedTransfer(f"endpoint {endpoint:#04x} is not a control endpoint: no SETUP")
            setup_bytes = _NO_SETUP
        if direction == USBIP_DIR_IN:
            transfer_flags |= _URB_DIR_IN  # vhci sends the URB's own direction flag
        isos: tuple[IsoPacketDescriptor, ...] = ()
        lengths: tuple[int, ...] = ()
        if iso_packets is not None:
            lengths = tuple(iso_packets)
            if not lengths or any(n < 0 for n in lengths):
                raise UnsupportedTransfer("an isochronous URB needs at least one packet, no negative lengths")
            if sum(lengths) != length:
                raise UnsupportedTransfer(f"iso packet lengths add up to {sum(lengths)}, the URB moves {length}")
            offsets = [0]
            for n in lengths[:-1]:
                offsets.append(offsets[-1] + n)
            isos = tuple(IsoPacketDescriptor(offset=o, length=n) for o, n in zip(offsets, lengths, strict=True))
            transfer_flags |= _URB_ISO_ASAP
        conn = link.conn
        seqnum = conn.next_seqnum()
        # The codec only needs len() and the buffer protocol of an OUT payload.
        if into is not None and (not number or isos or direction != USBIP_DIR_IN or into.readonly
                                 or into.format != "B" or len(into) < length):
            raise UnsupportedTransfer("into: a writable byte view as long as the transfer, for bulk or interrupt IN")
        if not isos:  # control, bulk or interrupt: the core packs it without a message object
            link.queue(conn.submit_plain(seqnum, self.devid, direction, number, transfer_flags, length,
                                         typing.cast(bytes, payload), interval, into, setup_bytes))
        else:
            link.send(CmdSubmit(seqnum=seqnum, devid=self.devid, direction=direction, ep=number,
                                transfer_flags=transfer_flags, transfer_buffer_length=length,
                                number_of_packets=len(isos), interval=interval, setup=setup_bytes,
                                transfer_buffer=typing.cast(bytes, payload), iso_packet_descriptors=isos))
        # (a LocalProtocolError above leaves nothing registered)
        return self._register(seqnum, endpoint, length, lengths, on_done, into, timeout)

    def _register(self, seqnum: int, endpoint: int, length: int, iso_lengths: tuple[int, ...],
                  on_done: Callable[[Urb], None] | None, into: memoryview | None, timeout: float | None) -> Urb:
        """The `Urb` of a CMD_SUBMIT just queued, registered for its answer, its deadline armed."""
        urb = Urb(seqnum, endpoint, length, self._new_future(), iso_lengths)
        urb.on_done = on_done
        urb.into = into
        self._urbs[seqnum] = urb
        if timeout is not None:
            urb.deadline = self._expire_at(timeout)
        return urb

    def _expire_at(self, timeout: float) -> float:
        """The deadline of a URB submitted now with `timeout`, the watchdog armed for it."""
        deadline = self._time() + timeout
        if self._watchdog is None or deadline < self._watchdog_when:
            self._arm(deadline)
        return deadline

    def submit_group(self, transfers: Sequence[tuple[int, bytes | int, memoryview | None]], *,
                     timeout: float | None = DEFAULT_TIMEOUT) -> UrbGroup:
        """Send several bulk/interrupt CMD_SUBMITs now, as `submit` would one by one — `(endpoint, length, into)`
        for IN (into may be None), `(endpoint, bytes, None)` for OUT — and return them as one `UrbGroup` that
        ends when all of them did. The cheap way to run URBs that normally all succeed (a Bulk-Only command):
        see `UrbGroup`. The timeout, from now, applies to each URB."""
        link = self._link
        if link.lost is not None:
            raise link.lost
        if type(transfers) is not tuple:
            transfers = tuple(transfers)
        # all checked first: all or none are submitted
        lengths = [_plain_length(endpoint, data_or_length, into) for endpoint, data_or_length, into in transfers]
        if -1 in lengths:
            endpoint, data_or_length, _ = transfers[lengths.index(-1)]
            raise UnsupportedTransfer(f"a URB group takes bulk or interrupt IN of a length (into: a writable "
                                      f"byte view that long) or OUT of bytes, not {endpoint:#04x} "
                                      f"{type(data_or_length).__name__}")
        seqnums: list[int] = []
        out: list[bytes] = []
        try:  # one core call for all (each one's seqnum goes to `seqnums` as it is queued: a refusal raises)
            urbs = [(_DIR_IN, endpoint & 0x0F, _URB_DIR_IN, length, b"", into) if endpoint & 0x80
                    else (_DIR_OUT, endpoint, 0, length, data_or_length, None)
                    for (endpoint, data_or_length, into), length in zip(transfers, lengths, strict=True)]
            link.conn.submit_plain_many(self.devid, urbs, out, seqnums)
        finally:
            if out:
                link.queue(out)  # what was accepted, in one write
            group = UrbGroup(self, seqnums, transfers, lengths, self._new_future())  # type: ignore[arg-type]
            grouped = self._grouped
            for index, seqnum in enumerate(seqnums):
                grouped[seqnum] = (group, index)
            if timeout is not None and seqnums:
                group.deadline = self._expire_at(timeout)
            if len(seqnums) < len(transfers):  # what was queued are real URBs: as if submitted one by one
                self._ungroup(group)
        return group

    def _ungroup(self, group: UrbGroup) -> list[Urb]:
        """Turn `group` into `Urb`s: done ones with their results, pending ones registered (see `UrbGroup`)."""
        urbs = group._urbs
        if urbs is not None:
            return urbs
        urbs = group._urbs = []
        group.clean = False
        for index, seqnum in enumerate(group.seqnums):
            endpoint, _, into = group.transfers[index]
            urb = Urb(seqnum, endpoint, group.lengths[index], self._new_future())
            urb.into = into
            urb.deadline = group.deadline
            ret = group.results[index]
            if ret is not None:
                urb.future.set_result(UrbResult(ret[1], ret[2], ret[5], False, ret[3], ret[4], ()))
            elif self._grouped.pop(seqnum, None) is not None:
                self._urbs[seqnum] = urb
            urbs.append(urb)
        if not group.future.done():
            group.future.set_result(None)
            if group.on_done is not None:
                group._call_back()
        return urbs

    def _ungroup_all(self) -> None:
        for group in dict.fromkeys(entry[0] for entry in self._grouped.values()):
            self._ungroup(group)

    async def wait_group(self, group: UrbGroup) -> None:
        """Wait until `group` ended (cleanly, or turned into `Urb`s: see `UrbGroup`). If the waiting task is
        cancelled, the group's pending URBs are unlinked in the background."""
        future = group.future
        if future.done():
            return
        group.awaited = True
        link = self._link
        if link._out:  # someone waits now: send what is queued without waiting for the loop's next turn
            link.flush()
        try:
            await future
        except asyncio.CancelledError:
            for urb in self._ungroup(group):
                self.cancel(urb)
            raise

    # One timer for all URBs rather than one each: deadlines mostly grow, so a submit rarely re-arms it.
    def _arm(self, when: float) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = self._loop.call_at(when, self._check_deadlines)
        self._watchdog_when = when

    def _check_deadlines(self) -> None:
        self._watchdog = None
        now = self._loop.time()
        following = None
        for group in {entry[0] for entry in self._grouped.values()}:
            deadline = group.deadline
            if deadline is None:
                continue
            if deadline <= now:  # its pending URBs become Urbs with this deadline: unlinked below
                self._ungroup(group)
            elif following is None or deadline < following:
                following = deadline
        for urb in list(self._urbs.values()):
            deadline = urb.deadline
            if deadline is None or urb.unlink_seqnum is not None:
                continue
            if deadline <= now:
                urb.timed_out = True
                log.debug("%s: URB %d on %#04x timed out, unlinking", self.busid, urb.seqnum, urb.endpoint)
                self._send_unlink(urb)
            elif following is None or deadline < following:
                following = deadline
        if following is not None:
            self._arm(following)

    def _send_unlink(self, urb: Urb) -> None:
        if urb.unlink_seqnum is not None or self._link.lost is not None:
            return
        conn = self._link.conn
        seqnum = conn.next_seqnum()
        self._link.send(CmdUnlink(seqnum=seqnum, devid=self.devid, unlink_seqnum=urb.seqnum))
        urb.unlink_seqnum = seqnum
        self._unlinks[seqnum] = urb
        self._loop.call_later(UNLINK_TIMEOUT, self._unlink_overdue, urb)

    def _unlink_overdue(self, urb: Urb) -> None:
        if self._urbs.get(urb.seqnum) is urb and self._link.lost is None:
            self._link.abort(DeviceGone(
                f"{self._link.peer} did not answer the CMD_UNLINK of URB {urb.seqnum} within "
                f"{UNLINK_TIMEOUT:g} s; the connection is considered dead"))

    async def unlink(self, urb: Urb) -> UrbResult:
        """Cancel `urb` (CMD_UNLINK) and return how it ended: `unlinked=True` if the server cancelled it,
        or its real result if it completed first (the RET_SUBMIT won the race)."""
        if not urb.done():
            self._send_unlink(urb)
        if isinstance(urb.future, BlockingFuture):  # nothing cancels a blocking wait: no shield needed
            return typing.cast(UrbResult, await urb.future)
        return await asyncio.shield(urb.future)

    def create_future(self) -> asyncio.Future[Any]:
        """A future of this device's loop (asyncio's, or the blocking runtime's), e.g. for a completion
        callback to wake a waiting coroutine."""
        return self._new_future()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run one of this device's coroutines (or one built on them, e.g. `MassStorage`'s) to its end in the
        calling thread: for a device from `import_device_blocking` (on asyncio, await it instead)."""
        if not isinstance(self._loop, BlockingLoop):
            coro.close()
            raise HostError("run() is for a device imported with import_device_blocking; on asyncio, await it")
        return self._loop.run(coro)

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` on this device's loop (the blocking runtime serves the connection meanwhile)."""
        if isinstance(self._loop, BlockingLoop):
            await self._loop.sleep(seconds)
        else:
            await asyncio.sleep(seconds)

    def batched(self) -> contextlib.AbstractContextManager[None]:
        """`with device.batched(): ...submit()...`: the URBs submitted in the block leave in one write when it
        ends, rather than at the end of the event loop's turn (a turn of the loop less per batch)."""
        return _Batch(self._link)

    async def wait(self, urb: Urb) -> UrbResult:
        """The result of `urb`. If the waiting task is cancelled, the URB is unlinked in the background."""
        future = urb.future
        if future.done():
            return future.result()
        link = self._link
        if link._out:  # someone waits now: send what is queued without waiting for the loop's next turn
            link.flush()
        try:
            return await future
        except asyncio.CancelledError:
            self.cancel(urb)
            raise

    def cancel(self, urb: Urb) -> None:
        """Unlink `urb` without waiting (its future is not resolved any more if it was cancelled)."""
        if self._urbs.get(urb.seqnum) is urb:
            with contextlib.suppress(HostError):
                self._send_unlink(urb)

    async def drain(self) -> None:
        """Wait until the socket takes more data (call between large OUT submissions)."""
        await self._link.drain()

    def check(self, urb: Urb, result: UrbResult, what: str | SetupPacket = "") -> UrbResult:
        """Raise the matching `TransferError` for a failed `result`, else return it. `what` names the
        transfer in the message (a SETUP packet is named only if needed: formatting it is not free)."""
        if result.status == 0 and not result.unlinked:
            return result
        if isinstance(what, SetupPacket):
            what = f"control request {what}"
        label = what or f"transfer on endpoint {urb.endpoint:#04x}"
        if result.unlinked and urb.timed_out:
            raise TransferTimeout(f"{label} timed out (URB {urb.seqnum} unlinked)", status=-ETIMEDOUT,
                                  endpoint=urb.endpoint)
        text = status_text(result.status)
        if result.unlinked:
            text = f"unlinked ({status_text(result.status)})"
        cls = StallError if result.status == -EPIPE and not result.unlinked else TransferError
        raise cls(f"{label} failed: {text}", status=result.status, endpoint=urb.endpoint,
                  actual_length=result.actual_length, data=result.data)

    async def _run(self, endpoint: int, data_or_length: bytes | bytearray | memoryview | int,
                   timeout: float | None, what: str | SetupPacket, setup: SetupPacket | None = None) -> UrbResult:
        with self.batched():  # written now, not at the end of the turn: the wait below follows at once
            urb = self.submit(endpoint, data_or_length, setup=setup, timeout=timeout)
        if not isinstance(data_or_length, int) and len(data_or_length) > _WRITE_HIGH_WATER:
            await self.drain()
        return self.check(urb, await self.wait(urb), what)

    # -- transfers -------------------------------------------------------------------------------------------

    async def control_transfer(self, request_type: int, request: int, value: int = 0, index: int = 0,
                               data_or_length: bytes | bytearray | memoryview | int = 0,
                               timeout: float | None = DEFAULT_TIMEOUT) -> bytes | int:
        """A control transfer on ep0: IN returns the bytes read, OUT the number of bytes written."""
        is_in = bool(request_type & 0x80)
        if is_in:
            if not isinstance(data_or_length, int):
                raise UnsupportedTransfer("an IN control request takes wLength, not data")
            length = data_or_length
        else:
            if isinstance(data_or_length, int):
                if data_or_length:
                    raise UnsupportedTransfer("an OUT control request takes its data stage, not a length")
                data_or_length = b""
            length = len(data_or_length)
        try:
            setup = SetupPacket(request_type, request, value, index, length)
        except UsbError as exc:
            raise UnsupportedTransfer(f"bad control request: {exc}") from None
        result = await self._run(0x80 if is_in else 0x00, data_or_length, timeout, setup, setup=setup)
        return result.data if is_in else result.actual_length

    async def request(self, setup: SetupPacket, data: bytes | bytearray | memoryview = b"",
                      timeout: float | None = DEFAULT_TIMEOUT) -> bytes | int:
        """Run a prepared SETUP packet (e.g. from `emulator.usb.setup`'s builders): IN returns the data
        (wLength is the buffer), OUT sends `data`, which must be wLength bytes."""
        if setup.request_type & 0x80:
            result = await self._run(0x80, setup.length, timeout, setup, setup=setup)
            return result.data
        if len(data) != setup.length:
            raise UnsupportedTransfer(f"{setup} announces wLength {setup.length} but {len(data)} bytes were given")
        result = await self._run(0x00, data, timeout, setup, setup=setup)
        return result.actual_length

    def _check_type(self, endpoint: int, wanted: TransferType, direction_in: bool) -> None:
        if bool(endpoint & 0x80) != direction_in:
            raise UnsupportedTransfer(f"endpoint {endpoint:#04x} is an {'IN' if endpoint & 0x80 else 'OUT'} "
                                      f"endpoint")
        if endpoint & 0x0F == 0:
            raise UnsupportedTransfer("endpoint 0 is the control endpoint: use control_transfer()")
        descriptor = self.find_endpoint(endpoint)
        if descriptor is not None and descriptor.transfer_type != wanted:
            raise UnsupportedTransfer(f"endpoint {endpoint:#04x} is {descriptor.transfer_type.name.lower()}, "
                                      f"not {wanted.name.lower()}")

    async def bulk_in(self, endpoint: int, length: int, timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
        self._check_type(endpoint, TransferType.BULK, True)
        return (await self._run(endpoint, length, timeout, f"bulk IN {endpoint:#04x}")).data

    async def bulk_out(self, endpoint: int, data: bytes | bytearray | memoryview,
                       timeout: float | None = DEFAULT_TIMEOUT) -> int:
        self._check_type(endpoint, TransferType.BULK, False)
        return (await self._run(endpoint, data, timeout, f"bulk OUT {endpoint:#04x}")).actual_length

    async def interrupt_in(self, endpoint: int, length: int, timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
        self._check_type(endpoint, TransferType.INTERRUPT, True)
        return (await self._run(endpoint, length, timeout, f"interrupt IN {endpoint:#04x}")).data

    async def interrupt_out(self, endpoint: int, data: bytes | bytearray | memoryview,
                            timeout: float | None = DEFAULT_TIMEOUT) -> int:
        self._check_type(endpoint, TransferType.INTERRUPT, False)
        return (await self._run(endpoint, data, timeout, f"interrupt OUT {endpoint:#04x}")).actual_length

    async def _iso(self, endpoint: int, data_or_length: bytes | int, packets: Sequence[int],
                   timeout: float | None) -> tuple[IsoPacketResult, ...]:
        descriptor = self.find_endpoint(endpoint)
        if descriptor is None or descriptor.transfer_type != TransferType.ISOCHRONOUS:
            kind = "unknown" if descriptor is None else descriptor.transfer_type.name.lower()
            raise UnsupportedTransfer(f"endpoint {endpoint:#04x} is {kind}, not isochronous in the active "
                                      "configuration: refusing an isochronous transfer")
        urb = self.submit(endpoint, data_or_length, timeout=timeout, iso_packets=packets,
                          interval=descriptor.interval)
        result = self.check(urb, await self.wait(urb), f"isochronous transfer on {endpoint:#04x}")
        return result.iso_packets

    async def iso_in(self, endpoint: int, packet_lengths: Sequence[int],
                     timeout: float | None = DEFAULT_TIMEOUT) -> tuple[IsoPacketResult, ...]:
        """One isochronous IN URB of len(packet_lengths) packets; per-packet status and data."""
        return await self._iso(endpoint, sum(packet_lengths), packet_lengths, timeout)

    async def iso_out(self, endpoint: int, packets: Sequence[bytes],
                      timeout: float | None = DEFAULT_TIMEOUT) -> tuple[IsoPacketResult, ...]:
        """One isochronous OUT URB carrying `packets`; per-packet status."""
        return await self._iso(endpoint, b"".join(packets), [len(p) for p in packets], timeout)

    # -- chapter 9 -------------------------------------------------------------------------------------------

    async def get_descriptor(self, descriptor_type: int, index: int = 0, length: int = 0xFF,
                             language: int = 0, timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
        data = await self.request(get_descriptor(descriptor_type, index, length, language), timeout=timeout)
        assert isinstance(data, bytes)
        return data

    async def enumerate(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Read the device descriptor and every configuration with GET_DESCRIPTOR, as the hub driver does
        after attach (usb_new_device -> usb_get_configuration)."""
        raw = await self.get_descriptor(DescriptorType.DEVICE, 0, 18, timeout=timeout)
        try:
            device = DeviceDescriptor.from_bytes(raw)
        except UsbError as exc:
            raise HostError(f"{self.busid}: malformed device descriptor {raw.hex()}: {exc}") from None
        configurations = []
        raws = []
        for index in range(device.num_configurations):
            head = await self.get_descriptor(DescriptorType.CONFIGURATION, index, 9, timeout=timeout)
            if len(head) < 4:
                raise HostError(f"{self.busid}: configuration {index} header is {len(head)} bytes")
            (total,) = struct.unpack_from("<H", head, 2)
            full = await self.get_descriptor(DescriptorType.CONFIGURATION, index, total, timeout=timeout)
            try:
                configurations.append(parse_configuration(full))
            except UsbError as exc:
                raise HostError(f"{self.busid}: malformed configuration descriptor {index}: {exc}") from None
            raws.append(full)
        udev = self.udev
        if (device.id_vendor, device.id_product) != (udev.idVendor, udev.idProduct):
            log.warning("%s: the device descriptor says %04x:%04x, the import reply said %04x:%04x",
                        self.busid, device.id_vendor, device.id_product, udev.idVendor, udev.idProduct)
        self.device_descriptor = device
        self.configurations = tuple(configurations)
        self.raw_configurations = tuple(raws)

    def configuration(self, value: int | None = None) -> Configuration | None:
        """The configuration with bConfigurationValue `value` (default: the active one)."""
        value = self.configuration_value if value is None else value
        return next((c for c in self.configurations if c.descriptor.configuration_value == value), None)

    def find_endpoint(self, address: int) -> EndpointDescriptor | None:
        """`address`'s descriptor in the active configuration and alternate settings (or, before a
        configuration is known, in any configuration's default settings)."""
        configs = [c for c in (self.configuration(),) if c is not None] or list(self.configurations)
        for config in configs:
            for interface in config.interfaces:
                alternate = interface.alternate(self.alternate_settings.get(interface.number, 0))
                if alternate is None:
                    continue
                for endpoint in alternate.endpoints:
                    if endpoint.address == address:
                        return endpoint.descriptor
        return None

    async def langids(self, timeout: float | None = DEFAULT_TIMEOUT) -> tuple[int, ...]:
        """The LANGIDs of string descriptor 0 (empty if the device has no strings: it stalls)."""
        if self._langids is None:
            try:
                raw = await self.get_descriptor(DescriptorType.STRING, 0, 0xFF, timeout=timeout)
            except StallError:
                self._langids = ()
            else:
                try:
                    parsed = parse_string(raw, 0)
                except UsbError as exc:
                    raise HostError(f"{self.busid}: malformed LANGID list {raw.hex()}: {exc}") from None
                assert isinstance(parsed, LanguageDescriptor)
                self._langids = tuple(parsed.langids)
        return self._langids

    async def get_string(self, index: int, langid: int | None = None,
                         timeout: float | None = DEFAULT_TIMEOUT) -> str | None:
        """String descriptor `index` (None for index 0, which means "no string")."""
        if index == 0:
            return None
        if langid is None:
            langids = await self.langids(timeout)
            if not langids:
                raise HostError(f"{self.busid}: the device has no string descriptors (no LANGIDs)")
            langid = langids[0]
        key = (index, langid)
        if key not in self._strings:
            raw = await self.get_descriptor(DescriptorType.STRING, index, 0xFF, langid, timeout=timeout)
            try:
                parsed = parse_string(raw, index)
            except UsbError as exc:
                raise HostError(f"{self.busid}: malformed string descriptor {index}: {exc}") from None
            assert isinstance(parsed, StringDescriptor)
            self._strings[key] = parsed.string
        return self._strings[key]

    async def get_configuration(self, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        data = await self.request(get_configuration(), timeout=timeout)
        assert isinstance(data, bytes)
        if len(data) != 1:
            raise HostError(f"{self.busid}: GET_CONFIGURATION returned {len(data)} bytes, not 1")
        self.configuration_value = data[0]
        return data[0]

    async def set_configuration(self, value: int = 1, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        if value and self.configuration(value) is None:
            known = sorted(c.descriptor.configuration_value for c in self.configurations)
            raise HostError(f"{self.busid}: no configuration {value} (the device has {known})")
        await self.request(set_configuration(value), timeout=timeout)
        self.configuration_value = value
        self.alternate_settings.clear()

    async def set_interface(self, interface: int, alternate: int,
                            timeout: float | None = DEFAULT_TIMEOUT) -> None:
        await self.request(set_interface(interface, alternate), timeout=timeout)
        self.alternate_settings[interface] = alternate

    async def clear_halt(self, endpoint: int, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """CLEAR_FEATURE(ENDPOINT_HALT) on `endpoint`, as usb_clear_halt() sends it."""
        await self.request(clear_halt(endpoint), timeout=timeout)

    async def reset(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """USB port reset (the hub request the stub turns into usb_reset_device()); the device is then
        unconfigured."""
        await self.request(_PORT_RESET, timeout=timeout)
        self.configuration_value = 0
        self.alternate_settings.clear()

    # -- lifetime --------------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Release the device: close the connection (the server then frees it for other importers);
        URBs still pending fail with DeviceGone."""
        await self._link.close()

    async def __aenter__(self) -> RemoteDevice:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "UNLINK_TIMEOUT",
    "DeviceGone",
    "HostConnectError",
    "HostError",
    "ImportRefused",
    "IsoPacketResult",
    "RemoteDevice",
    "StallError",
    "TransferError",
    "TransferTimeout",
    "UnsupportedTransfer",
    "Urb",
    "UrbGroup",
    "UrbResult",
    "import_device",
    "import_device_blocking",
    "list_devices",
    "list_devices_blocking",
    "op_status_text",
    "status_text",
]
