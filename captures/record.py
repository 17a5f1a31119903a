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

Cost and durability: a tap call frames what the socket moved and writes it with one `writev` before it returns,
on the edge's own thread: the frame headers are packed in one pass over the call's buffers and the payload goes to
the kernel as the edge's buffers (or views of them), never copied in Python. READ data the server sendfiles from
a read-only image comes as a file region (`SessionTap.data_parts`), copied into the recording file to file by
`copy_file_range` between the writes of its frames' headers and tails (pread and write where the kernel cannot
copy between the two files); either way the recording costs one copy of the data into the page cache, which no
framing can avoid (tools/bench/bench_record.py measures it as its floor). No queue and no recorder thread:
with one core per process (server and client of a loopback benchmark) a thread has no free core to run on, and
its GIL hand-overs cost more than the write. A tap that gets a reply batch as the buffers the edge passes to
`sendmsg` (`SessionTap.data_iov`) records it without the edge joining them. So what a peer was sent is in the
page cache when the call returns: a crash of the process loses nothing already sent (a SIGKILL landing inside a
write can cut that last block short; tshark reads everything before it). No fsync: a machine crash can lose what
the page cache held. When the file cannot be written (disk full, quota, file size limit, I/O error), or a
region's file ends before the region does (an image that shrank under the server), the recorder cuts it back to
the last whole block, logs one error and stops recording; the session it watched goes on. An
exception inside the recorder is handled the same way: recording must never take a server down.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import platform
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
from emulator.devices.base import FileRegion
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
_RET_PEEK = struct.Struct(">II16xi4xI")  # a RET_SUBMIT's command, seqnum, actual_length, number_of_packets
_CMD_PEEK = struct.Struct(">II4xI8xi4xI")  # a CMD_SUBMIT's command, seqnum, direction, length, number_of_packets
_EPB_HEAD = struct.Struct("<IIIIIII")
_EPB_START = struct.Struct("<III")  # an EPB's type, length and interface
_STAMP = struct.Struct("<II")  # its timestamp (high, low)
_EPB_LENGTHS = struct.Struct("<II")  # its captured and original lengths
_U32 = struct.Struct("<I")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")  # indexed by caplen % 4
_MAX_SEGMENT = wire.MAX_SEGMENT
# a frame's end: padding to 32 bits and the block's length again, indexed by the padding's size
_TAILS = tuple(struct.Struct(f"<{pad}xI").pack for pad in range(4))
# copy_file_range cannot copy between these two files (another filesystem, a block device, an old kernel)
_NO_COPY = frozenset((errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF))

_Piece = bytes | bytearray | memoryview | FileRegion  # what a tap call's parts may be (emulator.tap.PartsTap)


def _read(parts: Sequence[_Piece]) -> Sequence[bytes | bytearray | memoryview]:
    """`parts` with any file region read into bytes, for the recorder's general path (OSError if a file ended
    before its region did)."""
    if not any(type(part) is FileRegion for part in parts):
        return parts  # type: ignore[return-value]  # no region among them
    return [bytes(part) if type(part) is FileRegion else part for part in parts]  # type: ignore[misc]


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of `data` at the file's position (a regular file writes short only at a limit: this gets the
    error then)."""
    rest = memoryview(data)
    while rest:
        rest = rest[os.write(fd, rest) :]


@functools.lru_cache(maxsize=256)
def _sized(filled: int) -> tuple[bytes, bytes, bytes, int]:
    """What an EPB of one IPv4 segment of `filled` payload bytes holds that depends on that length only: its
    start (block type, length, interface), its captured and original lengths, its tail (padding, the length
    again) and its whole size. A recording has few distinct segment lengths (65495, 48, 61, a READ's rest)."""
    caplen = 54 + filled
    pad = -caplen & 3
    block = 32 + caplen + pad
    return _EPB_START.pack(6, block, 0), _EPB_LENGTHS.pack(caplen, caplen), _TAILS[pad](block), block


def _segment(layout: _Layout, stamp: bytes, filled: int, ip_id: int, own: int,
             ack: int, window: int) -> tuple[bytes, bytes, int]:
    """A segment of `filled` payload bytes as an Enhanced Packet Block: its header (EPB with `stamp` packed by
    `_STAMP`, Ethernet, IPv4 with its checksum, TCP, in one pack: `layout` is `_layout()`), its tail (padding
    and the closing length), and the block's whole size. The payload goes between the two."""
    pack, prefix, route, base = layout
    start, lengths, tail, block = _sized(filled)
    folded = base + 40 + filled + ip_id
    folded = (folded & 0xFFFF) + (folded >> 16)
    return pack(
        start, stamp, lengths, prefix, 40 + filled, ip_id, b"\x40\0\x40\x06", ~(folded + (folded >> 16)) & 0xFFFF,
        route, own & 0xFFFFFFFF, ack, 0x50, 0x18, window,
    ), tail, block  # fmt: skip


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

    `cut` is fed the bytes of a tap call a buffer at a time and notes where messages end; the recorder ends a
    segment there (server's direction only) and at the end of each tap call.
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

    def cut(self, data: bytes | bytearray | memoryview, base: int, cuts: list[tuple[int, str | None]]) -> None:
        """Append to `cuts` the offsets (plus `base`) in `data` where messages end, with each one's comment (if
        any), in the server's direction (`split`); the client's segments end where its socket writes did."""
        n = len(data)
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
                    cuts.append((base + pos, self.comment))
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
        self.position += n

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

    def _measure(self, buf: bytes | bytearray | memoryview, pos: int, end: int) -> int | None:
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


def _cstr(raw: bytes | bytearray | memoryview) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode("ascii", "replace")


class _Conn:
    """One recorded connection: its TCP framing and both directions' USB/IP framing."""

    __slots__ = ("busid", "directions", "ipv4", "key", "number", "recorder", "streams", "tcp", "unlinks")

    def __init__(
        self, recorder: PcapngRecorder, key: tuple[int, int], number: int, client: Address, server: Address
    ) -> None:
        self.recorder = recorder
        self.key = key
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
        # (server's, client's) header layouts for the recorder's fast paths; None for IPv6 (the general path)
        self.ipv4 = None if self.tcp.ipv6 else (_layout(self.tcp, False), _layout(self.tcp, True))


_Layout = tuple[Any, bytes, bytes, int]  # `_segment`'s header pack, and the constants of wire.TcpFrames.ipv4_layout


def _layout(tcp: wire.TcpFrames, to_server: bool) -> _Layout:
    """The pack of a whole segment header, EPB (its start, stamp, lengths: bytes packed little-endian as
    pcapng has them) then Ethernet/IPv4/TCP (big-endian, `ipv4_layout`'s struct), and that header's
    constants."""
    header, prefix, route, base = tcp.ipv4_layout(to_server)
    return struct.Struct(">12s8s8s" + header.format.lstrip(">!")).pack, prefix, route, base


class _EdgeTap:
    """A `SessionTap` (and plain tap) feeding one recorder, with its own space of connection ids."""

    __slots__ = ("_edge", "_recorder", "data", "data_iov", "data_parts")

    def __init__(self, recorder: PcapngRecorder, edge: int) -> None:
        self._recorder = recorder
        self._edge = edge
        # bound once: a tap call is one Python call into the recorder, not a method lookup and a forward
        self.data_iov = functools.partial(recorder._on_data, edge)
        self.data_parts = self.data_iov  # file regions are welcome: copied file to file (`_write`)
        self.data = functools.partial(recorder._on_chunk, edge)

    def opened(self, cid: int, client: Address, server: Address) -> None:
        self._recorder._on_open((self._edge, cid), client, server)

    def closed(self, cid: int, reason: str) -> None:
        self._recorder._on_close((self._edge, cid), reason)

    def __call__(self, cid: int, from_client: bool, data: bytes) -> None:
        self._recorder._on_data(self._edge, cid, from_client, (data,))


class PcapngRecorder:
    """Writes USB/IP sessions to a pcapng file as they happen (see the module docstring for the format).

    `mode` names the recording side ("server", "host"), `address` the listen address (server) or the remote
    server (host), `devices` the exported or imported devices. The file is created (truncated) and its header
    written at once, so a path that cannot be written raises `RecordError` before anything is served.

    Each tap call frames what it is given and writes it with one `writev` before it returns, on the caller's
    thread: no copy in Python (the payload buffers go to the kernel as they are), no queue, no thread to hand
    the GIL to, and nothing held back that a crash could lose. A lock keeps the frames of tap calls from
    several threads whole and in order.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mode: str,
        address: str,
        devices: Iterable[RecordedDevice] = (),
        comment: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.mode = mode
        self.address = address
        self.devices = {d.busid: d for d in devices}
        self.frames = 0
        self.connections = 0
        self.error: str | None = None
        self._conns: dict[tuple[int, int], _Conn] = {}
        self._edges = itertools.count()
        self._notes: list[str] = []
        self._lock = threading.Lock()
        self._closed = False
        self._off = False  # closed, or stopped by an error: tap calls return at once
        self._regions = False  # the frames being written hold a file region (`_frame_server` sets it)
        self._copy_file_range = True  # until the kernel says it cannot copy between these files
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

    # -- the tap side (the edge's thread): frame, write, return ------------------------------------------

    @property
    def tap(self) -> _EdgeTap:
        """A tap for one edge: pass it as `UsbipServer(tap=...)` or `import_device(..., tap=...)`. Each access
        gives a tap with its own connection ids, so one recorder can watch several servers or hosts."""
        return _EdgeTap(self, next(self._edges))

    def annotate(self, note: str) -> None:
        """A comment for the next frame written (e.g. what enumeration learnt about an imported device)."""
        with self._lock:
            if not self._closed:
                self._notes.append(note)

    def _on_open(self, key: tuple[int, int], client: Address, server: Address) -> None:
        with self._lock:
            if not self._closed and self.error is None:
                out: list[Any] = []
                self._guarded(out, self._open_conn, out, key, time.time_ns(), client, server)

    def _on_chunk(self, edge: int, cid: int, from_client: bool, data: bytes | memoryview) -> None:
        self._on_data(edge, cid, from_client, (data,))

    def _on_data(self, edge: int, cid: int, from_client: bool, parts: Sequence[_Piece]) -> None:
        """`parts`, in order, crossed connection `cid` of tap `edge` (one socket write or read; a file region
        is bytes of a file the edge sends without reading them)."""
        if self._off:
            return
        stamp = time.time_ns()
        with self._lock:
            if self._off:
                return
            out: list[Any] = []
            try:
                conn = self._conns.get((edge, cid))
                layouts = conn.ipv4 if conn is not None else None
                if conn is None or layouts is None or self._notes:
                    self._frame_data(out, (edge, cid), stamp, from_client, parts)
                    size = sum(map(len, out))
                elif from_client:
                    size = self._frame_client(out, conn, layouts[1], stamp, parts)
                else:
                    size = self._frame_server(out, conn, layouts[0], stamp, parts)
            except OSError as exc:  # a region read for the general path: its file ended early
                self._fail(exc.strerror or str(exc))
                return
            except Exception as exc:  # a recorder bug must not break the session
                self._fail(f"internal error: {exc!r}", exc)
                return
            try:
                if self._regions:  # file regions among the buffers: writev and copy_file_range in turn
                    self._regions = False
                    self._write(out)
                    return
                if len(out) <= _IOV_MAX:  # _write's usual case, inline
                    if os.writev(self._fd, out) == size:
                        self._offset += size
                        return
                    os.lseek(self._fd, self._offset, os.SEEK_SET)  # a short write: again, to finish or fail
                self._write(out)
            except OSError as exc:
                self._fail(exc.strerror or str(exc))

    def _frame_server(
        self,
        out: list[Any],
        conn: _Conn,
        layout: _Layout,
        stamp: int,
        parts: Sequence[_Piece],
    ) -> int:
        """`_frame_data` for the server's usual bytes (RET_SUBMITs of an IPv4 connection), in one loop: each
        message's buffers (or views of them, or file regions, whole or cut) go to `out` between its frames'
        headers and tails. At anything else at a message start, what follows goes to `_frame_data`, which
        takes over at that boundary. Returns the bytes in `out`."""
        stream = conn.streams[False]
        if stream.raw or stream.head or stream.comment is not None:
            self._frame_data(out, conn.key, stamp, False, parts)
            return sum(map(len, out))
        tcp = conn.tcp
        append = out.append
        peek = _RET_PEEK.unpack_from
        directions = conn.directions
        stamped = _STAMP.pack(stamp >> 32, stamp & 0xFFFFFFFF)
        own = tcp.seq[False]
        ack = tcp.seq[True] & 0xFFFFFFFF
        ip_id = tcp.ip_id
        window = tcp.window
        remaining = stream.remaining
        frames = 0
        size = 0

        head = len(out)  # where the current frame's header goes, once its length is known
        append(None)
        filled = 0
        done = 0  # bytes of `parts` framed
        index = 0
        for part in parts:
            region = type(part) is FileRegion
            if region:
                self._regions = True
                n = part.length  # type: ignore[union-attr]  # not len(): a Python call
            else:
                n = len(part)
            pos = 0
            while pos < n:
                if not remaining:  # a message starts: the usual RET_SUBMIT, or hand over
                    if n - pos < 48 or region:
                        break
                    command, seqnum, length, packets = peek(part, pos)  # type: ignore[arg-type]  # not a region
                    if (
                        command != USBIP_RET_SUBMIT
                        or (packets and packets != 0xFFFFFFFF)
                        or not 0 <= length <= _MAX_LENGTH
                        or seqnum not in directions
                    ):
                        break
                    remaining = 48 + length if directions.pop(seqnum) else 48
                if pos == 0 and n <= remaining and n <= _MAX_SEGMENT - filled:  # the whole buffer
                    append(part)
                    pos = n
                    filled += n
                    remaining -= n
                    if remaining and filled != _MAX_SEGMENT:
                        continue
                else:
                    take = n - pos
                    if take > remaining:
                        take = remaining
                    if take > _MAX_SEGMENT - filled:
                        take = _MAX_SEGMENT - filled
                    append(
                        FileRegion(part.fd, part.offset + pos, take)  # type: ignore[union-attr]
                        if region
                        else memoryview(part)[pos : pos + take]  # type: ignore[arg-type]
                    )
                    pos += take
                    filled += take
                    remaining -= take
                    if remaining and filled != _MAX_SEGMENT:
                        continue
                # a segment ends: a message's end, or 65495 bytes
                ip_id = (ip_id + 1) & 0xFFFF
                out[head], tail, block = _segment(layout, stamped, filled, ip_id, own, ack, window)
                append(tail)
                size += block
                head = len(out)
                append(None)
                own += filled
                filled = 0
                frames += 1
            done += pos
            if pos < n:  # hand over at this message boundary
                break
            index += 1
        if filled:  # the call ends inside a message: so does its segment
            ip_id = (ip_id + 1) & 0xFFFF
            out[head], tail, block = _segment(layout, stamped, filled, ip_id, own, ack, window)
            append(tail)
            size += block
            own += filled
            frames += 1
        else:
            del out[head]
        self.frames += frames
        tcp.seq[False] = own
        tcp.ip_id = ip_id
        stream.remaining = remaining
        stream.position += done
        if index < len(parts):
            part = parts[index]
            skip = done - sum(len(p) for p in parts[:index])
            if skip and type(part) is FileRegion:
                part = FileRegion(part.fd, part.offset + skip, part.length - skip)
            elif skip:
                part = memoryview(part)[skip:]  # type: ignore[arg-type]
            self._frame_data(out, conn.key, stamp, False, [part, *parts[index + 1 :]])
            return sum(map(len, out))
        return size

    def _frame_client(
        self,
        out: list[Any],
        conn: _Conn,
        layout: _Layout,
        stamp: int,
        parts: Sequence[_Piece],
    ) -> int:
        """`_frame_data` for the client's usual bytes (whole CMD_SUBMITs in one buffer, IPv4): the directions
        noted, the buffer framed as one segment. Anything else goes to `_frame_data` (noting a direction twice
        is harmless). Returns the bytes in `out`."""
        stream = conn.streams[True]
        data = parts[0] if len(parts) == 1 and type(parts[0]) is not FileRegion else b""
        n = len(data)
        pos = 0
        if 0 < n <= _MAX_SEGMENT and not (stream.raw or stream.head or stream.remaining or stream.comment):
            peek = _CMD_PEEK.unpack_from
            directions = conn.directions
            while n - pos >= 48:
                command, seqnum, direction, length, packets = peek(data, pos)  # type: ignore[arg-type]
                if command != USBIP_CMD_SUBMIT or direction > 1 or packets or not 0 <= length <= _MAX_LENGTH:
                    break
                directions[seqnum] = direction
                pos += 48 if direction else 48 + length
        if pos != n or not n:  # not whole CMD_SUBMITs in one buffer
            self._frame_data(out, conn.key, stamp, True, parts)
            return sum(map(len, out))
        stream.position += n
        tcp = conn.tcp
        seq = tcp.seq
        ip_id = tcp.ip_id = (tcp.ip_id + 1) & 0xFFFF
        own = seq[True]
        seq[True] = own + n
        header, tail, block = _segment(layout, _STAMP.pack(stamp >> 32, stamp & 0xFFFFFFFF), n, ip_id, own,
                                       seq[False] & 0xFFFFFFFF, tcp.window)
        out += (header, data, tail)
        self.frames += 1
        return block

    def _on_close(self, key: tuple[int, int], reason: str) -> None:
        with self._lock:
            conn = self._conns.pop(key, None)
            if conn is not None and not self._closed and self.error is None:
                out: list[Any] = []
                self._guarded(out, self._close_conn, out, conn, time.time_ns(), reason)

    def _guarded(self, out: list[Any], frame: Any, *args: Any) -> None:
        """`frame(*args)` (which appends a tap call's frames to `out`), then `out` written: a failure of either
        stops the recording, never the session (the frames of the call that failed are dropped whole)."""
        try:
            frame(*args)
        except Exception as exc:  # a recorder bug must not break the session
            self._fail(f"internal error: {exc!r}", exc)
            return
        try:
            self._write(out)
        except OSError as exc:
            self._fail(exc.strerror or str(exc))

    # -- framing --------------------------------------------------------------------------------------------

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
        conn = _Conn(self, key, self.connections, client, server)
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
        self,
        out: list[Any],
        key: tuple[int, int],
        stamp: int,
        from_client: bool,
        parts: Sequence[_Piece],
    ) -> None:
        """The frames of one tap call: a segment per server message (split at 65495 bytes), one for the client's
        socket write. Payload goes into `out` as the caller's buffers, or views of them, never copied (file
        regions are read: this is the path for what is not the usual traffic)."""
        parts = _read(parts)
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
        stream = conn.streams[from_client]
        cuts: list[tuple[int, str | None]] = []
        total = 0
        for part in parts:
            stream.cut(part, total, cuts)
            total += len(part)
        if not total:
            return
        if not cuts or cuts[-1][0] != total:
            cuts.append((total, stream.comment))
            stream.comment = None
        lengths: list[int] = []
        comments: list[str | None] = []
        start = 0
        for end, comment in cuts:
            if self._notes:
                comment = "; ".join([*self._notes, *([comment] if comment else [])])
                self._notes.clear()
            while start < end:
                n = min(end - start, _MAX_SEGMENT)
                lengths.append(n)
                comments.append(comment)
                start += n
                comment = None
        epb = _EPB_HEAD.pack
        hi, lo = stamp >> 32, stamp & 0xFFFFFFFF
        headers = conn.tcp.payload_headers(from_client, lengths)
        append = out.append
        index = 0  # the part the next payload byte is in, and where in it
        offset = 0
        part = parts[0]
        size = len(part)
        for n, comment, header in zip(lengths, comments, headers, strict=True):
            caplen = len(header) + n
            if comment:
                options = wire.options(((wire.OPT_COMMENT, wire.text(comment)),))
                length = 32 + caplen + (-caplen % 4) + len(options)
                tail = _PAD[caplen % 4] + options + _U32.pack(length)
            else:
                length = 32 + caplen + (-caplen % 4)
                tail = _PAD[caplen % 4] + _U32.pack(length)
            append(epb(wire.EPB_TYPE, length, 0, hi, lo, caplen, caplen) + header)
            while n:
                left = size - offset
                if left <= n:  # the rest of this part
                    if left:
                        append(part if offset == 0 else memoryview(part)[offset:])
                    n -= left
                    index += 1
                    if index < len(parts):
                        part = parts[index]
                        size = len(part)
                    offset = 0
                else:
                    append(memoryview(part)[offset : offset + n])
                    offset += n
                    n = 0
            append(tail)
        self.frames += len(lengths)

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
        """Write a tap call's whole frames in order: buffers with one `writev` per run of them (more only past
        IOV_MAX buffers), each file region between them copied file to file in the kernel (`_copy`). On
        failure the file is cut back to where they began, so it ends with a whole block (the caller reports
        the error)."""
        if not parts:
            return
        fd = self._fd
        start = self._offset
        try:
            run: list[Any] = []
            for part in parts:
                if type(part) is FileRegion:
                    self._writev(fd, run)
                    run = []
                    self._copy(fd, part)
                    continue
                run.append(part)
                if len(run) == _IOV_MAX:
                    self._writev(fd, run)
                    run = []
            self._writev(fd, run)
        except OSError:
            self._offset = start
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
                os.lseek(fd, start, os.SEEK_SET)
            raise

    def _writev(self, fd: int, buffers: list[Any]) -> None:
        if not buffers:
            return
        done = os.writev(fd, buffers)
        size = sum(map(len, buffers))
        if done < size:  # a regular file writes short only at a limit: finish, or get the error
            _write_all(fd, memoryview(b"".join(buffers))[done:])
        self._offset += size

    def _copy(self, fd: int, region: FileRegion) -> None:
        """Append `region`'s bytes: copy_file_range(2), one copy from page cache to page cache and none
        through Python; pread and write where the kernel cannot copy between the two files. OSError
        if the file ends before the region does."""
        source, offset, left = region.fd, region.offset, region.length
        while left:
            if self._copy_file_range:
                try:
                    done = os.copy_file_range(source, fd, left, offset)
                except OSError as exc:
                    if exc.errno not in _NO_COPY:
                        raise
                    self._copy_file_range = False
                    continue
            else:
                data = os.pread(source, min(left, 1 << 20), offset)
                done = len(data)
                _write_all(fd, data)
            if not done:
                raise OSError(
                    errno.ENODATA,
                    f"the file of a region being sent ended at byte {offset}, before the region's end at "
                    f"{region.offset + region.length} (did the image shrink?)",
                )
            offset += done
            left -= done
            self._offset += done

    def _fail(self, why: str, exc: BaseException | None = None) -> None:
        if self.error is not None:
            return
        self.error = why
        self._off = True
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
        """End the open connections' conversations (FIN) and close the file. Call it after the edges are done
        (later tap calls are ignored)."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._off = True
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
