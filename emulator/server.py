"""The USB/IP server: exports vusb `Device`s over TCP the way `usbipd` + `usbip-host` do.

Two layers. `UrbDispatcher` is pure: it runs CMD_SUBMITs against one `Device` and returns RET_SUBMITs,
keeping NAK'd transfers queued per endpoint (an interrupt IN waiting for a key press) until the device's
wake-up says they may complete; it cancels queued ones on unlink. `UsbipServer` is the asyncio edge: one
`ServerConnection` (emulator.usbip) per TCP connection, one importer per device at a time (a second one gets
ST_DEV_BUSY, an unknown busid ST_NODEV, as usbipd answers), many connections at once, many URBs in flight. Its
hot path takes bulk URBs as tuples (`ServerConnection.next_plain_submit`), answers an imported device's
URBs on a thread per session, and sends disk reads with sendfile (see `_Session`).

What the kernel's stub does besides forwarding, vusb does in the dispatcher: a port reset sent as a
SET_FEATURE(PORT_RESET) to recipient "other" (stub_rx.c `is_reset_device_cmd`) resets the device model;
everything else on ep0 — including SET_CONFIGURATION, SET_INTERFACE and CLEAR_FEATURE(ENDPOINT_HALT),
which the stub turns into usb_set_configuration()/usb_set_interface()/usb_clear_halt() — goes to the
device model, whose chapter-9 code does the same.

A peer that sends garbage gets its connection closed with the reason logged; a peer that vanishes is
noticed at the next read or write. Neither affects other connections or the devices' backing stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import cast

from emulator.devices.base import Device, FileRegion, Reply, TransferStatus
from emulator.errors import VusbError
from emulator.tap import SessionTap, Tap, data_callback, parts_callback, session_tap
from emulator.usb.setup import SetupPacket
from emulator.usbip import (
    NEED_DATA,
    ConnectionClosed,
    Phase,
    ServerConnection,
)
from emulator.usbip.codec import DEFAULT_LIMITS, Limits, PlainSubmit
from emulator.usbip.constants import (
    ST_DEV_BUSY,
    ST_NODEV,
    ST_OK,
    URB_SHORT_NOT_OK,
    USBIP_DIR_IN,
)
from emulator.usbip.errors import ProtocolError
from emulator.usbip.messages import (
    CmdSubmit,
    CmdUnlink,
    OpDevlistReplyExtra,
    OpRepDevlist,
    OpRepImport,
    OpReqDevlist,
    OpReqImport,
    RetSubmit,
    UsbDevice,
    UsbInterface,
)

log = logging.getLogger(__name__)

USBIP_PORT = 3240
_READ_SIZE = 1 << 18
_HIGH_WATER = 4 << 20
_IOV_MAX = 512
_SEND_AT_ONCE = 16 << 10  # replies carrying this much data are sent before the next URB is handled

# USB 2.0 11.24.2: hub class request SET_FEATURE(PORT_RESET) — bmRequestType 0x23 (class, other)
_PORT_RESET_REQUEST = (0x23, 0x03, 4)
_SHORT_NOT_OK = int(URB_SHORT_NOT_OK)  # a plain int: `&` with an IntFlag member runs enum.py per URB
_DIR_IN = int(USBIP_DIR_IN)
_OVERFLOW = int(TransferStatus.OVERFLOW)
_SHORT = int(TransferStatus.SHORT)
_DONTWAIT = int(socket.MSG_DONTWAIT)  # sends never block (the socket is non-blocking anyway; say it twice)
_DONTWAIT_MORE = _DONTWAIT | int(socket.MSG_MORE)  # a header whose payload follows by sendfile: one segment
_DONE = Phase.DONE  # a module name: `Phase.DONE` goes through EnumType.__getattr__ (Python 3.11) per read


# What a reply is written from. A FileRegion (READ data to sendfile) rides through the core's bytes-typed
# transfer_buffer as an opaque sized part: the core only takes its length and puts it in the iovec.
_Part = bytes | memoryview | FileRegion


def _as_bytes(part: _Part) -> bytes | memoryview:
    return bytes(part) if isinstance(part, FileRegion) else part


class _Broken(Exception):
    """A reply could not be written whole (the socket failed, or the image shrank under a region being
    sent): the stream is cut mid-message, so the connection has to go."""


class ServerError(VusbError):
    """The server could not start (port in use, bad address) or was misconfigured."""


@dataclass
class Export:
    """One exported device: its busid (`1-1`), where it sits (busnum/devnum), and who imported it."""

    busid: str
    device: Device
    busnum: int
    devnum: int
    importer: str | None = field(default=None, compare=False)

    @property
    def path(self) -> str:
        return f"/sys/devices/platform/vusb/usb{self.busnum}/{self.busid}"

    def usb_device(self) -> UsbDevice:
        s = self.device.summary()
        return UsbDevice(
            path=self.path,
            busid=self.busid,
            busnum=self.busnum,
            devnum=self.devnum,
            speed=int(s.speed),
            idVendor=s.id_vendor,
            idProduct=s.id_product,
            bcdDevice=s.bcd_device,
            bDeviceClass=s.device_class,
            bDeviceSubClass=s.device_subclass,
            bDeviceProtocol=s.device_protocol,
            bConfigurationValue=s.configuration_value,
            bNumConfigurations=s.num_configurations,
            bNumInterfaces=s.num_interfaces,
        )

    def interfaces(self) -> tuple[UsbInterface, ...]:
        return tuple(
            UsbInterface(
                bInterfaceClass=i.interface_class,
                bInterfaceSubClass=i.interface_subclass,
                bInterfaceProtocol=i.interface_protocol,
            )
            for i in self.device.summary().interfaces
        )


def make_exports(devices: Sequence[Device] | Mapping[str, Device], busnum: int = 1) -> dict[str, Export]:
    """Bus ids `1-1`, `1-2`, ... in order (or the mapping's own keys), device numbers 2, 3, ..."""
    items = (
        devices.items()
        if isinstance(devices, Mapping)
        else ((f"{busnum}-{i + 1}", d) for i, d in enumerate(devices))
    )
    exports: dict[str, Export] = {}
    for devnum, (busid, device) in enumerate(items, start=2):
        if busid in exports:
            raise ServerError(f"busid {busid} is exported twice")
        bus = int(busid.split("-", 1)[0]) if busid.split("-", 1)[0].isdigit() else busnum
        exports[busid] = Export(busid=busid, device=device, busnum=bus, devnum=devnum)
    return exports


def _ret_for(cmd: CmdSubmit, reply: Reply) -> RetSubmit:
    """The RET_SUBMIT that reports `reply` for `cmd`, with the kernel's length/short-packet rules."""
    status = int(reply.status)
    if cmd.direction == USBIP_DIR_IN:
        data = reply.data
        if len(data) > cmd.transfer_buffer_length:
            data = bytes(data)[: cmd.transfer_buffer_length]
            if status == 0:
                status = int(TransferStatus.OVERFLOW)
        elif status == 0 and cmd.transfer_flags & _SHORT_NOT_OK and len(data) < cmd.transfer_buffer_length:
            status = int(TransferStatus.SHORT)
        return RetSubmit(seqnum=cmd.seqnum, status=status, actual_length=len(data),
                         transfer_buffer=cast(bytes, data))
    actual = min(reply.length, cmd.transfer_buffer_length)
    return RetSubmit(seqnum=cmd.seqnum, status=status, actual_length=actual)


class UrbDispatcher:
    """Runs URBs against one device model; pure and synchronous.

    `submit` answers at once, or queues the URB when its endpoint NAKs (or already has URBs queued: order
    per endpoint is kept). `retry` completes what the device can now answer; `unlink` drops a queued URB.
    """

    def __init__(self, device: Device) -> None:
        self.device = device
        self._queues: dict[int, deque[CmdSubmit]] = {}

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def submit(self, cmd: CmdSubmit) -> RetSubmit | None:
        if cmd.number_of_packets > 0:  # isochronous: none of vusb's models has an iso endpoint
            return RetSubmit(seqnum=cmd.seqnum, status=int(TransferStatus.STALL), number_of_packets=0)
        if cmd.ep == 0:
            return self._control(cmd)
        is_in = cmd.direction == USBIP_DIR_IN
        address = cmd.ep | 0x80 if is_in else cmd.ep
        queue = self._queues.get(address)
        if queue:
            queue.append(cmd)
            return None
        if is_in:  # what _transfer does, without the call (once per URB)
            reply = self.device.transfer(address, None, cmd.transfer_buffer_length)
        else:
            reply = self.device.transfer(address, cmd.transfer_buffer, cmd.transfer_buffer_length)
        if reply is None:
            self._queues.setdefault(address, deque()).append(cmd)
            return None
        return _ret_for(cmd, reply)

    def submit_plain(self, urb: PlainSubmit) -> tuple[int, int, bytes | FileRegion] | None:
        """`submit` for a URB taken with `ServerConnection.next_plain_submit` (a non-iso transfer to a
        bulk or interrupt endpoint): its RET_SUBMIT's (status, actual_length, transfer_buffer), or None
        when it was queued. The same length and short-packet rules as `_ret_for`, without the objects."""
        seqnum, devid, direction, ep, flags, length, data = urb
        is_in = direction == _DIR_IN
        address = ep | 0x80 if is_in else ep
        if not self._queues.get(address):
            reply = self.device.transfer(address, None if is_in else data, length)
            if reply is not None:
                status = int(reply.status)
                if not is_in:
                    actual = reply.length
                    return status, actual if actual < length else length, b""
                payload = reply.data
                actual = payload.length if isinstance(payload, FileRegion) else len(payload)
                if actual > length:
                    payload = bytes(payload)[:length]
                    actual = length
                    if status == 0:
                        status = _OVERFLOW
                elif status == 0 and flags & _SHORT_NOT_OK and actual < length:
                    status = _SHORT
                return status, actual, payload
        cmd = CmdSubmit(
            seqnum=seqnum,
            devid=devid,
            direction=direction,
            ep=ep,
            transfer_flags=flags,
            transfer_buffer_length=length,
            transfer_buffer=data,
        )
        self._queues.setdefault(address, deque()).append(cmd)
        return None

    def _transfer(self, address: int, cmd: CmdSubmit) -> Reply | None:
        if cmd.direction == USBIP_DIR_IN:
            return self.device.transfer(address, None, cmd.transfer_buffer_length)
        return self.device.transfer(address, cmd.transfer_buffer, cmd.transfer_buffer_length)

    def _control(self, cmd: CmdSubmit) -> RetSubmit:
        try:
            setup = SetupPacket.from_bytes(cmd.setup)
        except VusbError as exc:
            log.info("seqnum %d: malformed setup packet %s: %s", cmd.seqnum, cmd.setup.hex(), exc)
            return RetSubmit(seqnum=cmd.seqnum, status=int(TransferStatus.STALL))
        if (setup.request_type, setup.request, setup.value) == _PORT_RESET_REQUEST:
            log.info("port reset requested by the client")
            self.cancel_all()
            self.device.reset()
            return RetSubmit(seqnum=cmd.seqnum)
        data = b"" if cmd.direction == USBIP_DIR_IN else cmd.transfer_buffer
        return _ret_for(cmd, self.device.control(setup, data))

    def retry(self) -> list[RetSubmit]:
        done: list[RetSubmit] = []
        for address, queue in self._queues.items():
            while queue:
                reply = self._transfer(address, queue[0])
                if reply is None:
                    break
                done.append(_ret_for(queue.popleft(), reply))
        return done

    def unlink(self, seqnum: int) -> bool:
        """Drop queued URB `seqnum`; False if it is not queued (already answered, or never seen)."""
        for queue in self._queues.values():
            for cmd in queue:
                if cmd.seqnum == seqnum:
                    queue.remove(cmd)
                    return True
        return False

    def cancel_all(self) -> None:
        self._queues.clear()


class _Session:
    """One TCP connection: its socket, the sans-I/O connection, and after an import, the dispatcher.

    Until the import the session is served by the event loop. Once a device is imported (and the server's
    `threads` is on), the URB phase runs on a thread of its own that waits in poll(2) and reads: a wake-up
    per batch of URBs rather than an epoll round and a turn of the event loop. The loop keeps what is not
    per-URB: device wake-ups (`on_wakeup`), writing what the socket did not take at once, and closing. One
    lock guards the connection, dispatcher and output queue between the two threads.

    Replies go out with `sendmsg` (header and payload as separate buffers: no copy in Python), READ data
    that is a `FileRegion` of the image with sendfile(2) (no copy through Python at all), never blocking:
    what the socket does not take at once waits in `_out` (regions read into bytes) and the loop writes it
    when the socket is writable; meanwhile reading pauses (the URB thread waits)."""

    def __init__(self, server: UsbipServer, cid: int, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.cid = cid
        self.sock = sock
        self.peer = peer
        self.loop = asyncio.get_running_loop()
        self.conn = ServerConnection(limits=server.limits)
        self.export: Export | None = None
        self.dispatcher: UrbDispatcher | None = None
        self.closed = asyncio.Event()
        self._out: deque[bytes | memoryview] = deque()
        self._out_bytes = 0
        self._reading = False
        self._writing = False  # a writer is registered: the socket did not take everything
        # One receive buffer for the session's life: recv_into it, no allocation per read (a 256 KiB
        # bytes per recv() costs an mmap/munmap pair, which under TCG is worth more than the URB).
        self._received = bytearray(_READ_SIZE)
        self._received_view = memoryview(self._received)
        self._closing: str | None = None
        self._lock = threading.RLock()
        self._drained = threading.Condition(self._lock)  # notified when `_out` empties or the session closes
        self._thread: threading.Thread | None = None  # the URB thread, once started
        self._thread_done = False
        self._thread_reason: str | None = None  # why the URB thread stopped (the peer closed, ...)
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._resume_reading()

    # -- socket edge ----------------------------------------------------------------------------------------

    def _resume_reading(self) -> None:
        if not self._reading and self._closing is None and self._thread is None:
            self.loop.add_reader(self.sock, self._on_readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading:
            self.loop.remove_reader(self.sock)
            self._reading = False

    def _on_readable(self) -> None:
        """The loop's reader: the operation phase (and the URB phase when the server runs no threads)."""
        try:
            nbytes = self.sock.recv_into(self._received)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"connection lost: {exc}")
            return
        reason = self._process(nbytes)
        if reason is not None:
            self.close(reason)
        elif self.dispatcher is not None and self.server.threads and self._closing is None:
            self._start_urb_thread()

    def _start_urb_thread(self) -> None:
        self._pause_reading()
        self._thread = threading.Thread(target=self._urb_loop, name=f"vusb-urbs-{self.cid}", daemon=True)
        self._thread.start()

    def _urb_loop(self) -> None:
        """The URB thread: read, answer, repeat; waits while the client leaves replies unread."""
        reason: str | None = None
        # The socket stays non-blocking (sendfile has no MSG_DONTWAIT): the thread waits in poll instead.
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        try:
            while reason is None:
                try:
                    poller.poll()
                    nbytes = self.sock.recv_into(self._received)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    reason = f"connection lost: {exc}"
                    with self._lock:
                        self._thread_reason = self._thread_reason or reason
                    break
                with self._lock:
                    if self._closing is not None:
                        break
                    reason = self._thread_reason = self._process(nbytes)
                    while self._out and self._closing is None:
                        self._drained.wait()
        except Exception as exc:  # a bug must not leave the session open with nobody reading it
            log.exception("%s: the URB thread failed", self.peer)
            reason = f"server error: {exc}"
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is being torn down
                self.loop.call_soon_threadsafe(self._urb_loop_ended, reason)

    def _urb_loop_ended(self, reason: str | None) -> None:
        self._thread_done = True
        if reason is not None:
            self.close(reason)
        self._finish_if_done()

    def _process(self, nbytes: int) -> str | None:
        """Take `nbytes` just received, answer what can be answered, send it; why to close, if so."""
        data = self._received_view[:nbytes]
        tap = self.server.tap_iov
        if nbytes and tap is not None:
            tap(self.cid, True, (data,))  # the receive buffer itself: valid for the call (emulator.tap)
        conn = self.conn
        try:
            conn.receive_data(data)
            out: list[_Part] = []
            while True:
                dispatcher = self.dispatcher
                if dispatcher is not None:  # the per-URB path: no message objects for a bulk transfer
                    urb = conn.next_plain_submit()
                    if urb is not None:
                        done = dispatcher.submit_plain(urb)
                        if done is not None:
                            status, actual, payload = done
                            out += conn.complete_plain(urb[0], status, actual, cast(bytes, payload))
                            region = type(payload) is FileRegion
                            if region or actual >= _SEND_AT_ONCE:  # see below
                                self._send(out, region)
                                out = []
                        continue
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                if type(event) is CmdSubmit and self.dispatcher is not None:  # _handle's first case, inline
                    ret = self.dispatcher.submit(event)
                    if ret is not None:
                        out += conn.complete_iov(ret)
                        buffer = cast(_Part, ret.transfer_buffer)
                        if type(buffer) is FileRegion or len(buffer) >= _SEND_AT_ONCE:
                            # A bulk payload leaves now: the client takes it in while the URBs behind it
                            # (a CSW read) are answered, as a server answering URB by URB would let it.
                            self._send(out)
                            out = []
                    continue
                if isinstance(event, ConnectionClosed):
                    self._send(out, False)
                    return "closed by peer"
                self._handle(event, out)
            self._send(out, False)  # a region is never left in `out`: it went at once, above
        except ProtocolError as exc:
            log.warning("%s: closing connection: %s", self.peer, exc)
            return f"protocol error: {exc}"
        except _Broken as exc:
            return str(exc)
        if conn.phase is _DONE:
            return "operation done"
        return None

    def _send(self, parts: Sequence[_Part], regions: bool | None = None) -> None:
        """Write `parts`; `regions` says whether a FileRegion is among them (None: look)."""
        if not parts or (self._closing is not None and self.sock.fileno() < 0):
            return
        if regions is None:
            regions = any(type(part) is FileRegion for part in parts)
        tap = self.server.tap_iov
        if tap is not None:  # the parts of this write as they are: a region is the tap's to read or copy
            tap(self.cid, False, parts)
        out = self._out
        if regions:
            if out:  # behind what waits: as bytes, which `_flush` can write
                parts = list(map(_as_bytes, parts))
            else:
                parts = self._send_regions(parts)
                if not parts:
                    return
        parts = cast(list[bytes | memoryview], parts)  # no FileRegion left in them
        if not out and len(parts) <= _IOV_MAX:  # nothing waiting: the usual case, all of it goes at once
            try:
                sent = self.sock.sendmsg(parts, (), _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # _flush meets the error again and closes
            size = sum(map(len, parts))
            if sent == size:
                return
            out.extend(parts)
            self._out_bytes = size
            self._consume(sent)
        else:
            waiting = bool(out)
            out.extend(parts)
            self._out_bytes += sum(map(len, parts))
            if waiting:  # the writer callback sends it after what is already queued
                if self._out_bytes > _HIGH_WATER:
                    self._pause_reading()
                return
        thread = self._thread
        if thread is not None and thread.ident == threading.get_ident():
            self.loop.call_soon_threadsafe(self._flush)  # the loop writes the rest; the thread waits
            return
        self._flush()
        if self._out_bytes > _HIGH_WATER:
            self._pause_reading()

    def _send_regions(self, parts: Sequence[_Part]) -> list[bytes | memoryview]:
        """Write `parts` (nothing is queued before them), each `FileRegion` with sendfile(2) and the buffers
        before it with one sendmsg(MSG_MORE): the image's page-cache pages go into the socket with no copy
        through Python. Returns what the socket did not take, regions read into bytes, for `_send` to
        queue. A socket error or an image that shrank leaves the stream cut mid-message: `_Broken`."""
        fd = self.sock.fileno()
        at = 0  # parts[at:] are not sent yet
        try:
            for i, part in enumerate(parts):
                if not isinstance(part, FileRegion):
                    continue
                if at < i:
                    head = cast(list[bytes | memoryview], parts[at:i])
                    size = sum(map(len, head))
                    try:
                        sent = self.sock.sendmsg(head, (), _DONTWAIT_MORE)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    if sent < size:
                        return [memoryview(b"".join(head))[sent:], *map(_as_bytes, parts[i:])]
                region = part
                offset, left = region.offset, region.length
                while left:
                    try:
                        sent = os.sendfile(fd, region.fd, offset, left)
                    except (BlockingIOError, InterruptedError):
                        return [bytes(FileRegion(region.fd, offset, left)), *map(_as_bytes, parts[i + 1 :])]
                    if not sent:
                        bytes(FileRegion(region.fd, offset, left))  # the image ended early: raises
                    offset += sent
                    left -= sent
                at = i + 1
        except OSError as exc:
            raise _Broken(f"connection lost: {exc}") from exc
        return cast(list[bytes | memoryview], parts[at:])  # no region among them: the loop sent those

    def _consume(self, sent: int) -> None:
        """Drop the first `sent` bytes of `_out` (the socket took them)."""
        out = self._out
        self._out_bytes -= sent
        while sent:
            head = out[0]
            if sent >= len(head):
                sent -= len(head)
                out.popleft()
            else:
                out[0] = memoryview(head)[sent:]
                sent = 0

    def _flush(self) -> None:
        """Write what waits in `_out` (on the loop: called directly, as the writer, or from the thread)."""
        with self._lock:
            out = self._out
            while out:
                try:  # sendmsg takes the deque itself unless it is longer than the kernel's iovec limit
                    sent = self.sock.sendmsg(
                        out if len(out) <= _IOV_MAX else list(islice(out, _IOV_MAX)), (), _DONTWAIT
                    )
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    out.clear()
                    self._out_bytes = 0
                    if self._writing:
                        self._writing = False
                        self.loop.remove_writer(self.sock)
                    self._drained.notify_all()
                    self.close(f"connection lost: {exc}")
                    return
                if sent == self._out_bytes:  # all of it went
                    out.clear()
                    self._out_bytes = 0
                    break
                self._consume(sent)
            if out:
                if not self._writing and self.sock.fileno() >= 0:
                    self._writing = True
                    self.loop.add_writer(self.sock, self._flush)
                return
            if self._writing:
                self._writing = False
                self.loop.remove_writer(self.sock)
            self._drained.notify_all()
        if self._closing is not None:
            self._finish_if_done()
        elif not self._reading and self._out_bytes <= _HIGH_WATER:
            self._resume_reading()

    # -- USB/IP -------------------------------------------------------------------------------------------

    def _wakeup_threadsafe(self) -> None:
        """The device's wake-up hook: may be called from any thread (a key typed in another thread)."""
        self.loop.call_soon_threadsafe(self.on_wakeup)

    def on_wakeup(self) -> None:
        """Called on the loop (via call_soon_threadsafe) when the device may complete queued URBs."""
        with self._lock:
            if self.dispatcher is None or self._closing is not None:
                return
            out: list[bytes] = []
            for ret in self.dispatcher.retry():
                out += self.conn.complete_iov(ret)
            try:
                self._send(out)
            except _Broken as exc:
                self.close(str(exc))

    def _handle(self, event: object, out: list[_Part]) -> None:
        if type(event) is CmdSubmit:
            assert self.dispatcher is not None
            ret = self.dispatcher.submit(event)
            if ret is not None:
                out += self.conn.complete_iov(ret)
        elif isinstance(event, CmdUnlink):
            assert self.dispatcher is not None
            self.dispatcher.unlink(event.unlink_seqnum)
            out += self.conn.send_iov(self.conn.ret_unlink_for(event.seqnum))
        elif isinstance(event, OpReqDevlist):
            devices = tuple(
                OpDevlistReplyExtra(udev=e.usb_device(), uinf=e.interfaces())
                for e in self.server.exports.values()
            )
            log.info("%s: device list (%d devices)", self.peer, len(devices))
            out += self.conn.send_iov(OpRepDevlist(status=ST_OK, devices=devices))
        elif isinstance(event, OpReqImport):
            out += self.conn.send_iov(self._import(event.busid))

    def _import(self, busid: str) -> OpRepImport:
        export = self.server.exports.get(busid)
        if export is None:
            log.info("%s: import of unknown busid %r refused (ST_NODEV)", self.peer, busid)
            return OpRepImport(status=ST_NODEV)
        if export.importer is not None:
            log.info(
                "%s: import of %s refused: in use by %s (ST_DEV_BUSY)", self.peer, busid, export.importer
            )
            return OpRepImport(status=ST_DEV_BUSY)
        export.importer = self.peer
        self.export = export
        export.device.reset()
        export.device.file_regions = True  # bulk IN data may be a FileRegion: `_send` sendfiles it
        self.dispatcher = UrbDispatcher(export.device)
        export.device.set_wakeup(self._wakeup_threadsafe)
        log.info("%s: imported %s (%r)", self.peer, busid, export.device)
        return OpRepImport(status=ST_OK, udev=export.usb_device())

    # -- ending ---------------------------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Stop reading, release the device, and close once what is queued has been sent (and the URB
        thread, if any, has stopped: shutting the socket's read side wakes it). On the loop."""
        if self._closing is not None:
            return
        threaded = self._thread is not None and not self._thread_done
        if threaded and self._thread_reason is None:
            # The peer may have closed already, its end of stream on its way to the URB thread: say so,
            # rather than blame whatever raced it (a server shutting down), as a loop reading it would.
            with contextlib.suppress(OSError):
                if self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    reason = "closed by peer"
        with self._lock:
            self._closing = self._thread_reason or reason
            self._drained.notify_all()
            self._pause_reading()
            self.release(reason)
        if threaded:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RD)
        self._finish_if_done()

    def _finish_if_done(self) -> None:
        if not self._out and (self._thread is None or self._thread_done):
            self._finish()

    def _finish(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_writer(self.sock)
            self.sock.close()
            if self.server._session_tap is not None:
                self.server._session_tap.closed(self.cid, self._closing or "closed")
        self.server._sessions.discard(self)
        self.closed.set()

    def release(self, reason: str) -> None:
        if self.export is not None:
            log.info("%s: released %s (%s)", self.peer, self.export.busid, reason)
            self.export.device.set_wakeup(None)
            self.export.device.file_regions = False
            if self.dispatcher is not None:
                self.dispatcher.cancel_all()
            self.export.device.reset()
            self.export.importer = None
            self.export = None


class UsbipServer:
    """An asyncio USB/IP server exporting device models.

        async with UsbipServer([mass_storage_device(...)]) as server:
            print(server.port)
            await server.serve_forever()

    Default bind is 127.0.0.1:3240; `port=0` picks a free port (see `.port`). With `threads` (the
    default) each imported session answers its URBs on a thread of its own; `threads=False` keeps
    everything on the event loop.
    """

    def __init__(
        self,
        devices: Sequence[Device] | Mapping[str, Device],
        *,
        host: str = "127.0.0.1",
        port: int = USBIP_PORT,
        limits: Limits = DEFAULT_LIMITS,
        tap: Tap | SessionTap | None = None,
        threads: bool = True,
    ) -> None:
        self.exports = make_exports(devices)
        self.threads = threads  # a thread per imported session for its URBs (see _Session)
        self.host = host
        self.port = port
        self.limits = limits
        self.tap = data_callback(tap)
        # What the sessions call: a socket read or write as its parts (regions of a write unread, emulator.tap)
        self.tap_iov = parts_callback(tap)
        self._session_tap = session_tap(tap)  # also told of connections opening and closing (emulator.tap)
        self._listeners: list[socket.socket] = []
        self._sessions: set[_Session] = set()
        self._next_cid = 0
        self._stopped: asyncio.Event | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        try:
            infos = await loop.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except OSError as exc:
            raise ServerError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise ServerError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._listeners.append(sock)
        loop.add_reader(sock, self._on_accept, sock)
        log.info("listening on %s:%d, exporting %s", self.host, self.port, ", ".join(self.exports))

    def _on_accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            self._next_cid += 1
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            log.info("connection %d from %s", self._next_cid, peer)
            if self._session_tap is not None and isinstance(addr, tuple):
                self._session_tap.opened(self._next_cid, addr[:2], sock.getsockname()[:2])
            self._sessions.add(_Session(self, self._next_cid, sock, peer))

    async def serve_forever(self) -> None:
        if not self._listeners:
            await self.start()
        assert self._stopped is not None
        await self._stopped.wait()

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    async def close(self) -> None:
        """Stop accepting, end every session (queued URBs are dropped), then flush and sync the devices."""
        loop = asyncio.get_running_loop()
        for sock in self._listeners:
            loop.remove_reader(sock)
            sock.close()
        self._listeners.clear()
        sessions = list(self._sessions)
        for session in sessions:
            session.close("server shutting down")
        if sessions:
            await asyncio.wait([asyncio.ensure_future(s.closed.wait()) for s in sessions], timeout=5)
        for session in list(self._sessions):  # a peer that never read its replies: drop them
            session._out.clear()
            session._finish()
        for export in self.exports.values():
            export.device.close()
        if self._stopped is not None:
            self._stopped.set()

    async def __aenter__(self) -> UsbipServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ServerThread:
    """A `UsbipServer` on its own event loop in a background thread, for synchronous code and tests.

    with ServerThread([hid_keyboard_device(kb)]) as server:
        subprocess.run(["usbip", "--tcp-port", str(server.port), "attach", "-r", "127.0.0.1", "-b", "1-1"])
    """

    def __init__(self, devices: Sequence[Device] | Mapping[str, Device], **options: object) -> None:
        options.setdefault("port", 0)
        self.server = UsbipServer(devices, **options)  # type: ignore[arg-type]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vusb-server", daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(30)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
