"""Recording USB/IP sessions to pcapng as they happen: `PcapngRecorder`, a tap for vusb's server and host.

    with PcapngRecorder("session.pcapng", mode="server", address="127.0.0.1:3240", devices=...) as recorder:
        server = UsbipServer(devices, tap=recorder.tap)          # or import_device(..., tap=recorder.tap)

What the file holds. The edges hand over the bytes their sockets moved (`emulator.tap`); the recorder frames them
as the TCP conversation they were, in one pcapng interface of link type Ethernet (LINKTYPE_ETHERNET, what
`tcpdump -i lo` writes, so every tool opens it, and IPv4 and IPv6 connections share one interface):

* a synthetic handshake (SYN with window scaling, so large pipelined transfers never look like a full window)
  when a connection opens, FIN/FIN/ACK when it closes, correct sequence and acknowledgment numbers between;
* the real client and server addresses, but the server port always written as 3240 (the real one is in the
  connection's comment), so `-d tcp.port==3240,usbip` and `vusb dissect` decode every recording alike;
* one TCP segment per USB/IP message the server sends (split at 65495 bytes, an IPv4 datagram's worth): the
  recorder follows the message framing itself (header lengths, and the CMD_SUBMIT direction a RET_SUBMIT's
  payload depends on), because tshark 4.0 mis-dissects RET_SUBMITs that share a segment (see
  tests/test_captures_tshark.py). The client's segments are its socket writes (several CMD_SUBMITs in one
  segment dissect fine, and fewer frames cost less). A stream the recorder cannot follow (garbage from a peer)
  is recorded as the socket chunks were, with a comment saying from where;
* metadata: `shb_userappl` "vusb <version>", comments naming the mode, the address and the devices, and comments
  on the frames where a connection opens, imports a device and closes.

Cost and durability: a tap call only stamps the time and copies the bytes into a ring (a few microseconds per
64 KiB on the session's event loop); the recorder's own thread lets two milliseconds of calls gather, frames them and writes
the batch with one `writev`, which runs without the GIL. So a crash of the process loses what that thread had
not written yet: normally the last few milliseconds of traffic, at most `high_water` bytes (32 MiB) when the
disk is slower than the session — beyond that a tap call waits for the disk. A SIGKILL landing inside a write
can cut the last block short (tshark reads everything before it). No fsync: a machine crash can lose what the
page cache held. When the file cannot be written (disk full, quota, file size limit, I/O error) the recorder
cuts it back to the last whole block, logs one error and stops recording; the session it watched goes on. An
exception inside the recorder is handled the same way: recording must never take a server down.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import platform
import queue
import struct
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captures import wire
from captures.errors import CaptureError
from captures.reader import LINKTYPE_ETHERNET
from emulator import __version__
from emulator.tap import Address
from emulator.usbip.constants import (
    USBIP_CMD_SUBMIT,
    USBIP_CMD_UNLINK,
    USBIP_MAX_ISO_PACKETS,
    USBIP_PORT,
    USBIP_RET_SUBMIT,
    USBIP_RET_UNLINK,
    USBIP_VERSION,
)

if TYPE_CHECKING:
    from emulator.devices.base import Device
    from emulator.server import Export

log = logging.getLogger(__name__)

SNAPLEN = 262144
_MAX_LENGTH = 64 << 20  # a USB/IP payload length beyond this is not a stream the recorder follows
_HEAD_MAX = 512  # bytes of a message kept while its length is unknown (OP_REP_IMPORT needs 320)
_TO_THE_END = 1 << 62  # OP_REP_DEVLIST: the rest of the stream (the server closes after it)
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024) - 3

_OP_REQ_DEVLIST, _OP_REP_DEVLIST, _OP_REQ_IMPORT, _OP_REP_IMPORT = 0x8005, 0x0005, 0x8003, 0x0003
_OP_STATUS = {0: "ST_OK", 1: "ST_NA", 2: "ST_DEV_BUSY", 3: "ST_DEV_ERR", 4: "ST_NODEV", 5: "ST_ERROR"}
# TCP options of the SYNs: MSS 65495 (kind 2), NOP, window scale 14 (kind 3): a 1 GiB window
_SYN_OPTIONS = struct.pack(">BBH", 2, 4, wire.MAX_SEGMENT) + bytes((1, 3, 3, 14))

_PEEK = struct.Struct(">HH")
_URB = struct.Struct(">IIIIIIiiI")  # usbip_header_basic, then the first four words of the command
_EPB_HEAD = struct.Struct("<IIIIIII")
_U32 = struct.Struct("<I")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")  # indexed by caplen % 4


class RecordError(CaptureError):
    """The recording file cannot be created or its first blocks cannot be written."""


@dataclass(frozen=True, slots=True)
class RecordedDevice:
    """A device a recording is about: what the header comments name."""

    busid: str
    id_vendor: int | None = None
    id_product: int | None = None
    product: str | None = None
    description: str | None = None

    def label(self) -> str:
        """`1-1 1d6b:0104 “Virtual Disk” (mass storage: disk.img)`, with whatever is known."""
        words = [self.busid]
        if self.id_vendor is not None and self.id_product is not None:
            words.append(f"{self.id_vendor:04x}:{self.id_product:04x}")
        if self.product:
            words.append(f"“{self.product}”")
        if self.description:
            words.append(f"({self.description})")
        return " ".join(words)


def exported_devices(
    exports: Mapping[str, Export] | Sequence[Device], descriptions: Sequence[str | None] = ()
) -> list[RecordedDevice]:
    """The `RecordedDevice`s of a server's exports (`UsbipServer.exports`, or the device list given to the server,
    numbered as the server numbers it), with optional descriptions in the same order."""
    if not isinstance(exports, Mapping):
        from emulator.server import make_exports

        exports = make_exports(exports)
    out = []
    for i, (busid, export) in enumerate(exports.items()):
        device = export.device
        d = device.device_descriptor
        product = device.strings.get(d.i_product) if d.i_product else None
        description = descriptions[i] if i < len(descriptions) else None
        out.append(RecordedDevice(busid, d.id_vendor, d.id_product, product, description))
    return out


class _Stream:
    """One direction of one connection: where its USB/IP messages begin and end.

    `cut(data)` returns the offsets in `data` where segments end, each with the comment (if any) for the
    segment ending there: the end of `data` always, and, in the server's direction (`split`), every message end.
    """

    __slots__ = ("comment", "conn", "from_client", "head", "position", "raw", "remaining", "split")

    def __init__(self, conn: _Conn, from_client: bool) -> None:
        self.conn = conn
        self.from_client = from_client
        self.split = not from_client
        self.remaining = 0  # bytes of the current message still to come; 0 at a message boundary
        self.head = bytearray()  # the start of a message whose length is not known yet
        self.raw = False  # lost the framing: segments follow the socket chunks
        self.comment: str | None = None
        self.position = 0  # stream offset of the next byte, for the lost-framing comment

    def cut(self, data: bytes | memoryview) -> list[tuple[int, str | None]]:
        n = len(data)
        cuts: list[tuple[int, str | None]] = []
        pos = 0
        unpack = _URB.unpack_from
        directions = self.conn.directions
        from_client = self.from_client
        while pos < n and not self.raw:
            remaining = self.remaining
            if remaining:
                if remaining > n - pos:
                    self.remaining = remaining - (n - pos)
                    break
                pos += remaining
                self.remaining = 0
                if self.split:
                    cuts.append((pos, self.comment))
                    self.comment = None
                continue
            if not self.head and n - pos >= 48 and data[pos] == 0 and data[pos + 1] == 0:
                # the hot path: a whole URB header, CMD_SUBMIT from the client or RET_SUBMIT from the server
                command, seqnum, _devid, direction, _ep, _word, length, _start, packets = unpack(data, pos)
                if packets == 0xFFFFFFFF:
                    packets = 0
                if 0 <= length <= _MAX_LENGTH and packets <= USBIP_MAX_ISO_PACKETS:
                    if command == USBIP_CMD_SUBMIT and from_client and direction <= 1:
                        directions[seqnum] = direction
                        self.remaining = 48 + 16 * packets + (length if direction == 0 else 0)
                        continue
                    if command == USBIP_RET_SUBMIT and not from_client and seqnum in directions:
                        is_in = directions.pop(seqnum)
                        self.remaining = 48 + 16 * packets + (length if is_in else 0)
                        continue
            head = self.head
            if head:
                buf = bytes(head) + bytes(data[pos : pos + _HEAD_MAX])
                total = self._measure(buf, 0, len(buf))
                if total is None:
                    if len(buf) >= _HEAD_MAX:
                        self._lose(pos, "a message header longer than any USB/IP message")
                        break
                    head += data[pos:]
                    pos = n
                    break
                if total < 0:
                    break
                self.remaining = total - len(head)
                head.clear()
                continue
            total = self._measure(data, pos, n)
            if total is None:
                self.head = bytearray(data[pos:])
                break
            if total < 0:
                break
            self.remaining = total
        if not cuts or cuts[-1][0] != n:
            cuts.append((n, self.comment))
            self.comment = None
        self.position += n
        return cuts

    def _lose(self, pos: int, why: str) -> int:
        self.raw = True
        self.head.clear()
        side = "client" if self.from_client else "server"
        self.comment = (
            f"vusb recorder: the {side}'s stream is not a USB/IP stream it can follow from byte "
            f"{self.position + pos} on ({why}); segments follow the socket's chunks"
        )
        log.debug("connection %d: %s", self.conn.number, self.comment)
        return -1

    def _measure(self, buf: bytes | memoryview, pos: int, end: int) -> int | None:
        """The length of the message starting at buf[pos]: None if more bytes are needed to tell, -1 if the
        stream cannot be followed (then `raw` is set). Notes what the message means to `comment`."""
        avail = end - pos
        if avail < 4:
            return None
        first, code = _PEEK.unpack_from(buf, pos)
        conn = self.conn
        if first == 0:
            if avail < 48:
                return None
            command, seqnum, _devid, direction, _ep, word, length, _start, packets = _URB.unpack_from(
                buf, pos
            )
            if packets == 0xFFFFFFFF:
                packets = 0
            if packets > USBIP_MAX_ISO_PACKETS:
                return self._lose(pos, f"number_of_packets {packets}")
            isos: int = 16 * packets
            if command == USBIP_CMD_SUBMIT and self.from_client and direction in (0, 1):
                if not 0 <= length <= _MAX_LENGTH:
                    return self._lose(pos, f"CMD_SUBMIT transfer_buffer_length {length}")
                conn.directions[seqnum] = direction
                return 48 + isos + (length if direction == 0 else 0)
            if command == USBIP_RET_SUBMIT and not self.from_client:
                cmd_direction = conn.directions.pop(seqnum, None)
                if cmd_direction is None:
                    return self._lose(pos, f"RET_SUBMIT of seqnum {seqnum}, which no CMD_SUBMIT announced")
                if not 0 <= length <= _MAX_LENGTH:
                    return self._lose(pos, f"RET_SUBMIT actual_length {length}")
                return 48 + isos + (length if cmd_direction == 1 else 0)
            if command == USBIP_CMD_UNLINK and self.from_client:
                conn.unlinks[seqnum] = word
                return 48
            if command == USBIP_RET_UNLINK and not self.from_client:
                target = conn.unlinks.pop(seqnum, None)
                if target is not None:  # its RET_SUBMIT came first, or never will
                    conn.directions.pop(target, None)
                return 48
            return self._lose(pos, f"command {command:#x}")
        if first != USBIP_VERSION:
            return self._lose(pos, f"version {first:#06x}")
        if code == _OP_REQ_DEVLIST and self.from_client:
            self.comment = f"connection {conn.number}: OP_REQ_DEVLIST"
            return 8
        if code == _OP_REQ_IMPORT and self.from_client:
            if avail < 40:
                return None
            busid = _cstr(buf[pos + 8 : pos + 40])
            conn.busid = busid
            self.comment = f"connection {conn.number}: OP_REQ_IMPORT of {conn.recorder.device_label(busid)}"
            return 40
        if code == _OP_REP_IMPORT and not self.from_client:
            if avail < 8:
                return None
            (status,) = struct.unpack_from(">I", buf, pos + 4)
            if status:
                self.comment = (
                    f"connection {conn.number}: import of {conn.busid or '?'} refused "
                    f"({_OP_STATUS.get(status, status)})"
                )
                return 8
            if avail < 320:
                return None
            busid = _cstr(buf[pos + 264 : pos + 296])
            vid, pid = struct.unpack_from(">HH", buf, pos + 308)
            self.comment = f"connection {conn.number}: imported {busid} {vid:04x}:{pid:04x} (ST_OK)"
            return 320
        if code == _OP_REP_DEVLIST and not self.from_client:
            if avail < 12:
                return None
            status, count = struct.unpack_from(">II", buf, pos + 4)
            self.comment = f"connection {conn.number}: OP_REP_DEVLIST, {count} device(s) ({_OP_STATUS.get(status, status)})"
            return _TO_THE_END
        return self._lose(pos, f"op code {code:#06x}")


def _cstr(raw: bytes | memoryview) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode("ascii", "replace")


class _Conn:
    """One recorded connection: its TCP framing and both directions' USB/IP framing."""

    __slots__ = ("busid", "directions", "number", "recorder", "streams", "tcp", "unlinks")

    def __init__(self, recorder: PcapngRecorder, number: int, client: Address, server: Address) -> None:
        self.recorder = recorder
        self.number = number
        client_port = client[1] if client[1] != USBIP_PORT else USBIP_PORT + 1
        self.tcp = wire.TcpFrames(
            (client[0], client_port),
            (server[0], USBIP_PORT),
            client_isn=0x10000000 * (number % 15 + 1),
            server_isn=0x20000000 + number,
            window=0xFFFF,
        )
        self.directions: dict[int, int] = {}  # seqnum of an unanswered CMD_SUBMIT -> its direction
        self.unlinks: dict[int, int] = {}  # seqnum of an unanswered CMD_UNLINK -> the seqnum it unlinks
        self.busid: str | None = None
        self.streams = {True: _Stream(self, True), False: _Stream(self, False)}


class _EdgeTap:
    """A `SessionTap` (and plain tap) feeding one recorder, with its own space of connection ids."""

    __slots__ = ("_edge", "_recorder")

    def __init__(self, recorder: PcapngRecorder, edge: int) -> None:
        self._recorder = recorder
        self._edge = edge

    def opened(self, cid: int, client: Address, server: Address) -> None:
        self._recorder._on_open((self._edge, cid), client, server)

    def data(self, cid: int, from_client: bool, data: bytes) -> None:
        self._recorder._on_data((self._edge, cid), from_client, data)

    def closed(self, cid: int, reason: str) -> None:
        self._recorder._on_close((self._edge, cid), reason)

    __call__ = data


_OPEN, _DATA, _CLOSE, _NOTE, _STOP = range(5)
# seconds the recorder thread lets tap calls gather: one GIL hand-over and one writev per batch, not per call
_BATCH_DELAY = 0.002


class PcapngRecorder:
    """Writes USB/IP sessions to a pcapng file as they happen (see the module docstring for the format).

    `mode` names the recording side ("server", "host"), `address` the listen address (server) or the remote
    server (host), `devices` the exported or imported devices. The file is created (truncated) and its header
    written at once, so a path that cannot be written raises `RecordError` before anything is served.

    Two threads. A tap call only stamps the time and copies the bytes into a ring of `ring_size` bytes; the
    recorder's own thread frames them and writes them with `writev`, which runs without the GIL, so neither the
    framing's Python nor the copy into the page cache sits on the session's event loop, and they overlap with
    its socket calls. `high_water` bounds the bytes queued: past it a tap call waits for the disk (the session
    slows down rather than the queue growing without limit).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mode: str,
        address: str,
        devices: Iterable[RecordedDevice] = (),
        comment: str | None = None,
        high_water: int = 32 << 20,
        ring_size: int = 16 << 20,
    ) -> None:
        self.path = Path(path)
        self.mode = mode
        self.address = address
        self.devices = {d.busid: d for d in devices}
        self.high_water = high_water
        self.frames = 0
        self.connections = 0
        self.error: str | None = None
        self._conns: dict[tuple[int, int], _Conn] = {}
        self._edges = itertools.count()
        self._notes: list[str] = []
        self._queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._queued = 0  # payload bytes queued (written by the tap side only)
        # Tap data is copied into this ring (memory that stays mapped) rather than kept as the edge's own bytes
        # objects: holding those for a batch makes the allocator give pages back and fault them in again, which
        # costs the session more than the copy. Positions are running byte counts; the ring index is mod size.
        self._ring = mmap.mmap(-1, ring_size)
        self._ring_view = memoryview(self._ring)
        self._produced = 0  # ring bytes handed out (tap side, under _ring_lock)
        self._released = 0  # ring bytes written and given back (recorder thread)
        self._ring_lock = threading.Lock()
        self._done = 0  # payload bytes framed and written (written by the recorder thread only)
        self._closed = False
        self._close_lock = threading.Lock()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise RecordError(f"cannot record to {self.path}: {exc.strerror or exc}") from None
        header = self._header(comment)
        try:
            if os.write(fd, header) != len(header):
                raise OSError(0, "short write (a file size limit?)")
        except OSError as exc:
            os.close(fd)
            raise RecordError(f"cannot record to {self.path}: {exc.strerror or exc}") from None
        self._fd = fd
        self._offset = len(header)  # end of the last whole block written
        self._thread = threading.Thread(target=self._run, name=f"vusb-record {self.path.name}", daemon=True)
        self._thread.start()

    # -- the header ------------------------------------------------------------------------------------

    def _header(self, comment: str | None) -> bytes:
        devices = "; ".join(d.label() for d in self.devices.values()) or "none named"
        role = {
            "server": f"vusb server listening on {self.address}, exporting {devices}",
            "host": f"vusb userspace host importing from {self.address}: {devices}",
        }.get(self.mode, f"vusb {self.mode} at {self.address}: {devices}")
        shb_comments = [role]
        if comment:
            shb_comments.append(comment)
        shb = wire.section_header(
            [
                (wire.SHB_OS, wire.text(f"{platform.system()} {platform.release()}")),
                (wire.SHB_USERAPPL, wire.text(f"vusb {__version__}")),
                *((wire.OPT_COMMENT, wire.text(c)) for c in shb_comments),
            ]
        )
        described = (
            f"USB/IP as vusb's {self.mode} ({self.address}) moved it through its sockets, framed as Ethernet/IP/"
            f"TCP with the server on port {USBIP_PORT}; decode with -d tcp.port=={USBIP_PORT},usbip"
        )
        idb = wire.interface_description(
            LINKTYPE_ETHERNET,
            SNAPLEN,
            [
                (wire.IF_NAME, wire.text(f"vusb-{self.mode}")),
                (wire.IF_DESCRIPTION, wire.text(described)),
                (wire.IF_TSRESOL, bytes([9])),
                *(
                    (wire.OPT_COMMENT, wire.text(f"{self.mode} device: {d.label()}"))
                    for d in self.devices.values()
                ),
            ],
        )
        return shb + idb

    def device_label(self, busid: str) -> str:
        device = self.devices.get(busid)
        return device.label() if device is not None else busid

    # -- the tap side (the session's thread): stamp, queue, return ----------------------------------------

    @property
    def tap(self) -> _EdgeTap:
        """A tap for one edge: pass it as `UsbipServer(tap=...)` or `import_device(..., tap=...)`. Each access
        gives a tap with its own connection ids, so one recorder can watch several servers or hosts."""
        return _EdgeTap(self, next(self._edges))

    def annotate(self, note: str) -> None:
        """A comment for the next frame written (e.g. what enumeration learnt about an imported device)."""
        if not self._closed:
            self._queue.put((_NOTE, note))

    def _on_open(self, key: tuple[int, int], client: Address, server: Address) -> None:
        if not self._closed and self.error is None:
            self._queue.put((_OPEN, key, time.time_ns(), client, server))

    def _on_data(self, key: tuple[int, int], from_client: bool, data: bytes) -> None:
        if self._closed or self.error is not None or not data:
            return
        n = len(data)
        size = len(self._ring)
        with self._ring_lock:  # ring order is queue order: the recorder thread gives space back in that order
            at = self._produced % size
            skip = size - at if at + n > size else 0  # a chunk never wraps: start over at 0
            if n <= size >> 2 and self._produced + skip + n - self._released <= size:
                at = (at + skip) % size
                self._ring_view[at : at + n] = data
                payload: bytes | memoryview = self._ring_view[at : at + n]
                self._produced += skip + n
                mark = self._produced
            else:  # no room (the disk is behind) or a huge chunk: keep the bytes themselves
                payload = data if type(data) is bytes else bytes(data)
                mark = 0
            self._queue.put((_DATA, key, time.time_ns(), from_client, payload, mark))
        self._queued += n
        if self._queued - self._done > self.high_water:
            self._wait_for_disk()

    def _on_close(self, key: tuple[int, int], reason: str) -> None:
        if not self._closed and self.error is None:
            self._queue.put((_CLOSE, key, time.time_ns(), reason))

    def _wait_for_disk(self) -> None:
        """Backpressure: the disk is slower than the session; wait until half the queue is written."""
        deadline = time.monotonic() + 60
        while (
            self._queued - self._done > self.high_water // 2
            and self.error is None
            and self._thread.is_alive()
            and time.monotonic() < deadline
        ):
            time.sleep(0.001)

    # -- the recorder's thread: frame and write ----------------------------------------------------------

    def _run(self) -> None:
        q = self._queue
        while True:
            events = [q.get()]
            time.sleep(_BATCH_DELAY)
            with contextlib.suppress(queue.Empty):
                while len(events) < 4096:
                    events.append(q.get_nowait())
            out: list[Any] = []
            payload = 0
            mark = 0
            stop = False
            for event in events:
                kind = event[0]
                if kind == _STOP:
                    stop = True
                    continue
                if kind == _DATA:
                    payload += len(event[4])
                    mark = event[5] or mark
                if self.error is None:
                    try:
                        self._handle(out, event)
                    except Exception as exc:  # a recorder bug must not break the session
                        self._fail(f"internal error: {exc!r}", exc)
            if out and self.error is None:
                try:
                    self._write(out)
                except OSError as exc:
                    self._fail(exc.strerror or str(exc))
            out.clear()  # drop the views into the ring before giving its space back
            if mark:
                self._released = mark
            self._done += payload
            if stop:
                return

    def _handle(self, out: list[Any], event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == _DATA:
            self._frame_data(out, event[1], event[2], event[3], event[4])
        elif kind == _OPEN:
            self._open_conn(out, event[1], event[2], event[3], event[4])
        elif kind == _CLOSE:
            conn = self._conns.pop(event[1], None)
            if conn is not None:
                self._close_conn(out, conn, event[2], event[3])
        elif kind == _NOTE:
            self._notes.append(event[1])

    def _open_conn(
        self,
        out: list[Any],
        key: tuple[int, int],
        stamp: int,
        client: Address,
        server: Address,
        where: str | None = None,
    ) -> _Conn:
        """A new conversation for `key` (ending one still open under the same id) and its handshake frames."""
        old = self._conns.pop(key, None)
        if old is not None:
            self._close_conn(out, old, stamp, "connection id reused")
        self.connections += 1
        conn = _Conn(self, self.connections, client, server)
        self._conns[key] = conn
        tcp = conn.tcp
        where = where or f"{client[0]}:{client[1]} → {server[0]}:{server[1]}"
        self._control(
            out,
            stamp,
            tcp.headers(True, 0, wire.TCP_SYN, tcp_options=_SYN_OPTIONS),
            f"connection {conn.number} ({self.mode}): {where}",
        )
        tcp.advance(True, 1)
        self._control(
            out, stamp, tcp.headers(False, 0, wire.TCP_SYN | wire.TCP_ACK, tcp_options=_SYN_OPTIONS)
        )
        tcp.advance(False, 1)
        self._control(out, stamp, tcp.headers(True, 0, wire.TCP_ACK))
        return conn

    def _frame_data(
        self, out: list[Any], key: tuple[int, int], stamp: int, from_client: bool, data: bytes | memoryview
    ) -> None:
        conn = self._conns.get(key)
        if conn is None:  # a plain tap, or bytes before `opened`: made-up endpoints
            conn = self._open_conn(
                out,
                key,
                stamp,
                ("10.0.0.2", 40000 + key[1] % 20000),
                ("10.0.0.1", USBIP_PORT),
                "endpoints unknown (the edge did not report them)",
            )
        segments: list[tuple[int, int, str | None]] = []  # (start, length, comment)
        start = 0
        for end, comment in conn.streams[from_client].cut(data):
            if self._notes:
                comment = "; ".join([*self._notes, *([comment] if comment else [])])
                self._notes.clear()
            while start < end:
                n = min(end - start, wire.MAX_SEGMENT)
                segments.append((start, n, comment))
                start += n
                comment = None
        epb = _EPB_HEAD.pack
        u32 = _U32.pack
        hi, lo = stamp >> 32, stamp & 0xFFFFFFFF
        view = memoryview(data)
        headers = conn.tcp.payload_headers(from_client, [n for _, n, _ in segments])
        for (start, n, comment), header in zip(segments, headers, strict=True):
            caplen = len(header) + n
            options = wire.options(((wire.OPT_COMMENT, wire.text(comment)),)) if comment else b""
            length = 32 + caplen + (-caplen % 4) + len(options)
            out.append(epb(wire.EPB_TYPE, length, 0, hi, lo, caplen, caplen) + header)
            out.append(view[start : start + n])
            out.append(_PAD[caplen % 4] + options + u32(length))
        frames = len(segments)
        self.frames += frames

    def _close_conn(self, out: list[Any], conn: _Conn, stamp: int, reason: str) -> None:
        """The FIN, FIN, ACK that end `conn`'s conversation."""
        tcp = conn.tcp
        self._control(
            out,
            stamp,
            tcp.headers(True, 0, wire.TCP_FIN | wire.TCP_ACK),
            f"connection {conn.number} closed: {reason}",
        )
        tcp.advance(True, 1)
        self._control(out, stamp, tcp.headers(False, 0, wire.TCP_FIN | wire.TCP_ACK))
        tcp.advance(False, 1)
        self._control(out, stamp, tcp.headers(True, 0, wire.TCP_ACK))

    def _control(self, out: list[Any], stamp: int, header: bytes, comment: str | None = None) -> None:
        """A frame without payload (SYN, FIN, ACK), with the pending notes and `comment`."""
        if self._notes:
            comment = "; ".join([*self._notes, *([comment] if comment else [])])
            self._notes.clear()
        items = [(wire.OPT_COMMENT, wire.text(comment))] if comment else ()
        out.append(wire.enhanced_packet(stamp, header, items=items))
        self.frames += 1

    def _write(self, parts: list[Any]) -> None:
        """Write a batch of whole frames with as few system calls as IOV_MAX allows; on failure the file is cut
        back to where the batch began, so it ends with a whole block (the caller reports the error)."""
        fd = self._fd
        start = self._offset
        try:
            for i in range(0, len(parts), _IOV_MAX):
                group = parts[i : i + _IOV_MAX]
                size = sum(map(len, group))
                done = os.writev(fd, group)
                if done < size:  # a regular file writes short only at a limit: finish, or get the error
                    rest = memoryview(b"".join(group))[done:]
                    while rest:
                        rest = rest[os.write(fd, rest) :]
                self._offset += size
        except OSError:
            self._offset = start
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
                os.lseek(fd, start, os.SEEK_SET)
            raise

    def _fail(self, why: str, exc: BaseException | None = None) -> None:
        if self.error is not None:
            return
        self.error = why
        log.error(
            "recording to %s stopped: %s; the session goes on unrecorded (the file keeps its %d bytes of whole "
            "frames)",
            self.path,
            why,
            self._offset,
            exc_info=exc,
        )

    # -- the end -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """End the open connections' conversations (FIN), write everything queued and close the file. Call it
        after the edges are done (later tap calls are ignored)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put((_STOP,))
        self._thread.join(120)
        try:
            if self.error is None and self._conns:
                out: list[Any] = []
                stamp = time.time_ns()
                for conn in self._conns.values():
                    self._close_conn(out, conn, stamp, "recording stopped")
                self._write(out)
        except OSError as exc:
            self._fail(exc.strerror or str(exc))
        finally:
            self._conns.clear()
            os.close(self._fd)
            with contextlib.suppress(
                queue.Empty
            ):  # tap calls that raced with close: their views into the ring
                while True:
                    self._queue.get_nowait()
            with contextlib.suppress(BufferError):
                self._ring_view.release()
                self._ring.close()

    @property
    def size(self) -> int:
        """Bytes of whole blocks written so far."""
        return self._offset

    def summary(self) -> str:
        """One line for people: what was recorded where, or why recording stopped."""
        text = f"recorded {self.frames} frames of {self.connections} connection(s) to {self.path} ({self.size} bytes)"
        if self.error is not None:
            text += f"; recording stopped early: {self.error}"
        return text

    def __enter__(self) -> PcapngRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["SNAPLEN", "PcapngRecorder", "RecordError", "RecordedDevice", "exported_devices"]
