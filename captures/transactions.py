"""Request/response pairing: a capture becomes a list of URB transactions and of SCSI commands.

What pairs with what:

* USB/IP (TCP, port 3240 by default): CMD_SUBMIT with the RET_SUBMIT of the same seqnum on the same connection;
  CMD_UNLINK with its RET_UNLINK, and a RET_UNLINK of -ECONNRESET closes the unlinked URB (no RET_SUBMIT will
  come for it, usbip_protocol.rst); OP_REQ_* with OP_REP_*.
* usbmon (link types 189 and 220): the 'S' record with the 'C' (or 'E', a submission error) of the same bus and
  URB id. URB ids are kernel addresses and are reused, but never while the URB is in flight.
* Bulk-Only Transport, on both: a CBW with the CSW of the same dCBWTag on the same device; the URBs moved in
  between are the data phase of that command.

Design: this is the fast path. It walks pcap/pcapng blocks (captures.reader), link, IP and TCP headers and the
USB/IP or usbmon headers with `struct` only, reassembles TCP with bytearrays that are touched only when a message
straddles segments, and never builds a scapy Packet: scapy costs tens of microseconds a frame, this loop about one.
Rich dissection is scapy's job, on demand, for the frames a person looks at (`captures.layers.read_packets`).
Both implement the same rules (kernel direction rule, ISO descriptors after the buffer, CBW/CSW by content), and
the tests hold them to each other and to tshark.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from captures.errors import CaptureError, TruncatedCaptureError
from captures.names import errno_name, opcode_name
from captures.reader import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    LINKTYPE_RAW_OLD,
    LINKTYPE_USB_LINUX,
    LINKTYPE_USB_LINUX_MMAPPED,
    RawFrame,
    iter_frames,
    linktype_name,
    load,
)
from emulator.usbip.codec import DEFAULT_LIMITS

USBIP_PORT = 3240

_ECONNRESET = -errno.ECONNRESET
_IP_LINKTYPES = frozenset(
    {
        LINKTYPE_NULL,
        LINKTYPE_ETHERNET,
        LINKTYPE_RAW_OLD,
        LINKTYPE_RAW,
        LINKTYPE_LOOP,
        LINKTYPE_LINUX_SLL,
        LINKTYPE_IPV4,
        LINKTYPE_IPV6,
        LINKTYPE_LINUX_SLL2,
    }
)
USBMON_TRANSFER_TYPES = ("isochronous", "interrupt", "control", "bulk")  # usbmon xfer_type 0..3
_EP_TRANSFER_TYPES = ("control", "isochronous", "bulk", "interrupt")  # bmAttributes & 3

# OP_* status words (tools/usb/usbip/libsrc/usbip_common.h)
OP_STATUS_NAMES = {0: "ST_OK", 1: "ST_NA", 2: "ST_DEV_BUSY", 3: "ST_DEV_ERR", 4: "ST_NODEV", 5: "ST_ERROR"}


def scsi_opcode_name(opcode: int | None, service_action: int | None = None) -> str | None:
    return None if opcode is None else opcode_name(opcode, service_action)


def status_name(status: int | None) -> str:
    return errno_name(status)


@dataclass(slots=True, eq=False)
class Transaction:
    """One request and its response: a URB (kind "submit"), an unlink ("unlink"), or an OP exchange ("import",
    "devlist"). Lengths are bytes; times are seconds from the capture's clock; status is the kernel's (0 or a
    negative errno for URBs, an ST_* code for OP exchanges), None while no response was seen."""

    protocol: str  # "usbip" | "usbmon"
    kind: str
    frame: int | None  # frame completing the request (None: the capture started after it)
    ts: float | None
    urb_id: int  # USB/IP seqnum, usbmon URB id
    busnum: int
    devnum: int
    endpoint: int  # address, with 0x80 for IN
    transfer_type: str | None  # control, bulk, interrupt, isochronous; None when USB/IP did not say
    requested_length: int  # transfer_buffer_length
    setup: bytes | None = None
    connection: str | None = None  # USB/IP: "client -> server"
    busid: str | None = None  # USB/IP: the exported busid imported on this connection
    response_frame: int | None = None
    response_ts: float | None = None
    status: int | None = None
    actual_length: int | None = None
    unlinked: bool = False  # cancelled by a successful CMD_UNLINK
    unlink_seqnum: int | None = None  # kind "unlink": the seqnum it cancels
    bot: str | None = None  # "CBW", "data", "CSW" for Bulk-Only Transport URBs
    bot_tag: int | None = None
    scsi_opcode: int | None = None
    scsi_service_action: int | None = None
    csw_status: int | None = None

    @property
    def direction(self) -> str:
        return "in" if self.endpoint & 0x80 else "out"

    @property
    def complete(self) -> bool:
        return self.response_frame is not None

    @property
    def latency(self) -> float | None:
        if self.ts is None or self.response_ts is None:
            return None
        return self.response_ts - self.ts

    @property
    def device(self) -> str:
        return f"{self.busnum}:{self.devnum}"

    @property
    def status_text(self) -> str:
        if self.kind in ("import", "devlist") and self.status is not None:
            return OP_STATUS_NAMES.get(self.status, str(self.status))
        if self.unlinked:
            return "unlinked"
        return status_name(self.status)

    @property
    def failed(self) -> bool:
        return self.status is not None and self.status != 0

    @property
    def scsi_name(self) -> str | None:
        return scsi_opcode_name(self.scsi_opcode, self.scsi_service_action)

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "kind": self.kind,
            "frame": self.frame,
            "response_frame": self.response_frame,
            "ts": self.ts,
            "response_ts": self.response_ts,
            "latency": self.latency,
            "urb_id": self.urb_id,
            "device": self.device,
            "busid": self.busid,
            "connection": self.connection,
            "endpoint": self.endpoint,
            "direction": self.direction,
            "transfer_type": self.transfer_type,
            "status": self.status,
            "status_name": self.status_text,
            "requested_length": self.requested_length,
            "actual_length": self.actual_length,
            "setup": self.setup.hex() if self.setup is not None else None,
            "unlinked": self.unlinked,
            "unlink_seqnum": self.unlink_seqnum,
            "bot": self.bot,
            "bot_tag": self.bot_tag,
            "scsi_opcode": self.scsi_opcode,
            "scsi_name": self.scsi_name,
            "csw_status": self.csw_status,
        }


@dataclass(slots=True, eq=False)
class ScsiCommand:
    """A SCSI command over Bulk-Only Transport: from the CBW's submission to the CSW's completion."""

    protocol: str
    busnum: int
    devnum: int
    busid: str | None
    lun: int
    tag: int
    opcode: int | None
    service_action: int | None
    data_transfer_length: int  # dCBWDataTransferLength
    data_in: bool
    logical_block_address: int | None
    blocks: int | None
    frame: int | None  # the CBW
    ts: float | None
    response_frame: int | None = None  # the CSW
    response_ts: float | None = None
    csw_status: int | None = None  # bCSWStatus: 0 passed, 1 failed, 2 phase error
    residue: int | None = None
    data_bytes: int = 0  # moved in the data phase

    @property
    def name(self) -> str | None:
        return scsi_opcode_name(self.opcode, self.service_action)

    @property
    def latency(self) -> float | None:
        if self.ts is None or self.response_ts is None:
            return None
        return self.response_ts - self.ts

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "device": f"{self.busnum}:{self.devnum}",
            "busid": self.busid,
            "lun": self.lun,
            "tag": self.tag,
            "opcode": self.opcode,
            "name": self.name,
            "logical_block_address": self.logical_block_address,
            "blocks": self.blocks,
            "data_transfer_length": self.data_transfer_length,
            "data_in": self.data_in,
            "frame": self.frame,
            "response_frame": self.response_frame,
            "latency": self.latency,
            "csw_status": self.csw_status,
            "residue": self.residue,
            "data_bytes": self.data_bytes,
        }


@dataclass(eq=False)
class Analysis:
    """Everything pairing learned from one capture."""

    source: str
    frames: int = 0
    records: int = 0  # usbmon records plus USB/IP messages
    transactions: list[Transaction] = field(default_factory=list)
    scsi_commands: list[ScsiCommand] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    protocols: set[str] = field(default_factory=set)


# --- helpers shared by both transports ---------------------------------------------------------------------------


class _BotDevice:
    """BOT state of one device: the command in progress and the commands waiting for their CSW, by tag."""

    __slots__ = ("by_tag", "current")

    def __init__(self) -> None:
        self.current: ScsiCommand | None = None
        self.by_tag: dict[int, ScsiCommand] = {}


_CBW = struct.Struct("<IIIBBB")
_CSW = struct.Struct("<IIIB")


def _cdb_lba_blocks(cdb: bytes) -> tuple[int | None, int | None]:
    op = cdb[0] if cdb else -1
    n = len(cdb)
    if op in (0x28, 0x2A, 0x2F, 0x35, 0x2E) and n >= 10:  # READ/WRITE/VERIFY/SYNC CACHE/WRITE AND VERIFY (10)
        lba, blocks = struct.unpack_from(">IxH", cdb, 2)
        return lba, blocks
    if op in (0xA8, 0xAA) and n >= 12:
        return struct.unpack_from(">II", cdb, 2)
    if op in (0x88, 0x8A, 0x91) and n >= 16:
        return struct.unpack_from(">QI", cdb, 2)
    if op in (0x08, 0x0A) and n >= 6:
        return ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3], cdb[4] or 256
    return None, None


# --- TCP reassembly for USB/IP -------------------------------------------------------------------------------------


class _Conn:
    """One USB/IP TCP connection: pending requests by seqnum, the imported busid, endpoint types learned."""

    __slots__ = (
        "bot",
        "broken",
        "busid",
        "ep_types",
        "name",
        "pending",
        "pending_op",
        "pending_unlinks",
        "phase",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.broken = False  # lenient analysis: the stream broke the protocol, the rest of it is skipped
        self.pending: dict[int, Transaction] = {}
        self.pending_unlinks: dict[int, Transaction] = {}
        self.pending_op: Transaction | None = None
        self.busid: str | None = None
        self.phase = "op"
        self.ep_types: dict[tuple[int, int], str] = {}
        self.bot: dict[int, _BotDevice] = {}


class _Flow:
    """One direction of a connection: the bytes not yet framed, and TCP sequence bookkeeping."""

    __slots__ = (
        "buf",
        "conn",
        "consumed",
        "from_start",
        "gap_warned",
        "next_seq",
        "ooo",
        "skipped",
        "synced",
        "to_server",
    )

    def __init__(self, conn: _Conn, to_server: bool) -> None:
        self.conn = conn
        self.to_server = to_server
        self.buf = bytearray()
        self.next_seq: int | None = None
        self.ooo: dict[int, bytes] = {}
        self.consumed = 0  # stream offset of buf[0]
        self.from_start = False  # saw the SYN: the stream must start with a message
        self.synced = False
        self.skipped = 0
        self.gap_warned = False


_LIMITS = DEFAULT_LIMITS  # the core's caps: usbfs' per-URB budget, USBIP_MAX_ISO_PACKETS
_MAX_PAYLOAD = _LIMITS.max_transfer_buffer_length + 16 * _LIMITS.max_number_of_packets
_U32 = 0xFFFFFFFF
_ETH_IPV4_TCP = struct.Struct(">12xHBxH2xHxB2x4s4sHHIIH")  # Ethernet + 20-byte IPv4 + TCP up to the flags
# A URB header: command seqnum devid direction ep, then the union's words (signed: status/flags, length,
# start_frame, number_of_packets, interval/error_count) and the 8 setup bytes.
_URB = struct.Struct(">IIIIIiiiii8s")


def _plausible(b: bytes | bytearray, pos: int, end: int) -> bool:
    if end - pos < 4:
        return False
    if b[pos] == 0 and b[pos + 1] == 0 and b[pos + 2] == 0 and 1 <= b[pos + 3] <= 4:
        return True
    return (
        b[pos] == 1
        and b[pos + 1] == 0x11
        and (b[pos + 2], b[pos + 3]) in ((0x80, 5), (0, 5), (0x80, 3), (0, 3))
    )


def _ret_data_follows(b: bytes | bytearray, pos: int, end: int, actual: int, npk: int) -> bool:
    """For a RET_SUBMIT whose CMD_SUBMIT was not captured: does IN data follow? Inferred from what comes next
    (the rule captures.layers.usbip applies too)."""
    if actual <= 0:
        return False
    iso = 16 * npk if npk > 0 else 0
    rest = end - pos - 48
    if rest == iso:
        return False
    if rest == actual + iso:
        return True
    in_ok = rest > actual + iso and _plausible(b, pos + 48 + actual + iso, end)
    return in_ok or not _plausible(b, pos + 48 + iso, end)


class _Pairer:
    def __init__(self, source: str, ports: Iterable[int], *, strict: bool = True) -> None:
        self.analysis = Analysis(source)
        self.ports = frozenset(ports)
        self.strict = strict
        self.transactions = self.analysis.transactions
        self.scsi = self.analysis.scsi_commands
        self.warnings = self.analysis.warnings
        self.records = 0
        self.flows: dict[
            bytes, _Flow
        ] = {}  # key: source address, destination address, ports (as in IPv4/TCP)
        self.usbmon_bot: dict[tuple[int, int], _BotDevice] = {}
        self.tcp_frames = 0
        self.fragment_warned = False
        self._stream_base = 0

    # -- driver ------------------------------------------------------------------------------------------------

    def run(self, frames: Iterator[RawFrame]) -> Analysis:
        usbmon_pending: dict[tuple[int, int], Transaction] = {}
        t: Transaction | None
        transactions = self.transactions
        append = transactions.append
        hdr_le = struct.Struct("<QBBBBHBBqiiII8s")
        hdr_be = struct.Struct(">QBBBBHBBqiiII8s")
        mm_le = struct.Struct("<I")
        mm_be = struct.Struct(">I")
        ip_linktypes = _IP_LINKTYPES
        bot_devices = self.usbmon_bot
        types = USBMON_TRANSFER_TYPES
        usbmon_records = 0
        number = 0
        for number, linktype, ts, buf, off, caplen, _origlen, big_endian in frames:
            if linktype == 189 or linktype == 220:
                if caplen < 48 or (linktype == 220 and caplen < 64):
                    raise CaptureError(
                        f"usbmon record of {caplen} bytes is shorter than its {48 if linktype == 189 else 64}-byte "
                        "header",
                        frame=number,
                        path=self.analysis.source,
                    )
                usbmon_records += 1
                (urb_id, typ, xfer, epnum, devnum, busnum, flag_setup, _flag_data, _ts_sec, _ts_usec, status, length,
                 len_cap, s) = (hdr_be if big_endian else hdr_le).unpack_from(buf, off)  # fmt: skip
                doff = off + 48
                if linktype == 220:
                    ndesc = (mm_be if big_endian else mm_le).unpack_from(buf, off + 60)[0]
                    doff = off + 64 + 16 * ndesc
                avail = off + caplen - doff
                if avail > len_cap:
                    avail = len_cap
                if xfer > 3:
                    raise CaptureError(
                        f"usbmon record has transfer type {xfer} (0..3 expected): not a usbmon record",
                        frame=number,
                        path=self.analysis.source,
                    )
                key = (busnum, urb_id)
                if typ == 83:  # 'S'
                    t = Transaction(
                        "usbmon",
                        "submit",
                        number,
                        ts,
                        urb_id,
                        busnum,
                        devnum,
                        epnum,
                        types[xfer],
                        length,
                        s if flag_setup == 0 else None,
                    )
                    usbmon_pending[key] = t
                    append(t)
                    if xfer == 3:
                        if not epnum & 0x80 and avail == 31 and buf[doff : doff + 4] == b"USBC":
                            self._open_cbw(t, buf, doff, bot_devices, (busnum, devnum))
                        else:
                            dev = bot_devices.get((busnum, devnum))
                            if dev is not None and dev.current is not None:
                                _annotate_data(t, dev.current)
                elif typ == 67 or typ == 69:  # 'C', 'E'
                    t = usbmon_pending.pop(key, None)
                    if t is None:
                        t = Transaction(
                            "usbmon", "submit", None, None, urb_id, busnum, devnum, epnum, types[xfer], length
                        )
                        append(t)
                    t.response_frame = number
                    t.response_ts = ts
                    t.status = status
                    t.actual_length = length
                    if xfer == 3 and epnum & 0x80:
                        if avail == 13 and buf[doff : doff + 4] == b"USBS":
                            self._close_csw(t, buf, doff, bot_devices.get((busnum, devnum)), (busnum, devnum))
                        elif t.bot == "data":
                            _count_data(t, bot_devices.get((busnum, devnum)))
                    elif t.bot == "data":
                        _count_data(t, bot_devices.get((busnum, devnum)))
                else:
                    raise CaptureError(
                        f"usbmon record has event type {typ:#04x} ('S', 'C' or 'E' expected): not a usbmon record",
                        frame=number,
                        path=self.analysis.source,
                    )
            elif linktype in ip_linktypes:
                self._tcp_frame(number, linktype, ts, buf, off, caplen, big_endian)
            else:
                raise CaptureError(
                    f"link type {linktype} ({linktype_name(linktype)}) is neither usbmon (189, 220) nor IP "
                    "carrying USB/IP; vusb reads usbmon captures and Ethernet, raw IP or Linux cooked captures",
                    frame=number,
                    path=self.analysis.source,
                )
        self.analysis.frames = number
        self.records += usbmon_records
        if usbmon_records:
            self.analysis.protocols.add("usbmon")
        self._finish()
        return self.analysis

    def _finish(self) -> None:
        for flow in self.flows.values():
            name = flow.conn.name + (" (to server)" if flow.to_server else " (to client)")
            if flow.buf:
                self.warnings.append(
                    f"{name}: the capture ends inside a USB/IP message ({len(flow.buf)} bytes buffered)"
                )
            if flow.ooo:
                missing = sum(len(v) for v in flow.ooo.values())
                self.warnings.append(
                    f"{name}: {missing} bytes after a gap in the TCP stream were never framed"
                )
            if flow.skipped:
                self.warnings.append(
                    f"{name}: skipped {flow.skipped} bytes at the start (capture began in the middle of a message)"
                )
        self.analysis.records = self.records
        if self.tcp_frames and not self.flows and not self.analysis.protocols:
            ports = ", ".join(str(p) for p in sorted(self.ports))
            self.warnings.append(f"no USB/IP traffic: {self.tcp_frames} IP frames, none on TCP port {ports}")

    # -- BOT --------------------------------------------------------------------------------------------------------

    def _open_cbw(
        self,
        t: Transaction,
        buf: bytes | bytearray,
        off: int,
        devices: dict[Any, _BotDevice],
        key: Any,
    ) -> None:
        _sig, tag, dtl, flags, lun, cblen = _CBW.unpack_from(buf, off)
        cdb = bytes(buf[off + 15 : off + 15 + min(cblen & 0x1F, 16)])
        opcode = cdb[0] if cdb else None
        service_action = cdb[1] & 0x1F if opcode == 0x9E and len(cdb) > 1 else None
        lba, blocks = _cdb_lba_blocks(cdb)
        cmd = ScsiCommand(
            t.protocol,
            t.busnum,
            t.devnum,
            t.busid,
            lun & 0x0F,
            tag,
            opcode,
            service_action,
            dtl,
            bool(flags & 0x80),
            lba,
            blocks,
            t.frame,
            t.ts,
        )
        self.scsi.append(cmd)
        dev = devices.get(key)
        if dev is None:
            dev = devices[key] = _BotDevice()
        dev.current = cmd
        dev.by_tag[tag] = cmd
        t.bot = "CBW"
        t.bot_tag = tag
        t.scsi_opcode = opcode
        t.scsi_service_action = service_action

    def _close_csw(
        self, t: Transaction, buf: bytes | bytearray, off: int, dev: _BotDevice | None, key: Any
    ) -> None:
        _sig, tag, residue, csw_status = _CSW.unpack_from(buf, off)
        cmd = dev.by_tag.pop(tag, None) if dev is not None else None
        t.bot = "CSW"
        t.bot_tag = tag
        t.csw_status = csw_status
        if cmd is None:
            self.warnings.append(
                f"frame {t.response_frame}: CSW with tag 0x{tag:08x} on device {t.device} answers no CBW seen"
            )
            return
        t.scsi_opcode = cmd.opcode
        t.scsi_service_action = cmd.service_action
        cmd.response_frame = t.response_frame
        cmd.response_ts = t.response_ts
        cmd.csw_status = csw_status
        cmd.residue = residue
        if dev is not None and dev.current is cmd:
            dev.current = None

    # -- USB/IP over TCP --------------------------------------------------------------------------------------------

    def _tcp_frame(
        self, number: int, linktype: int, ts: float, buf: bytes, off: int, caplen: int, big_endian: bool
    ) -> None:
        end = off + caplen
        if linktype == LINKTYPE_ETHERNET and caplen >= 54:
            # the common case in one unpack: Ethernet II, IPv4 without options, TCP
            etype, vihl, total, frag, proto, src, dst, sport, dport, seq, _ack, offflags = (
                _ETH_IPV4_TCP.unpack_from(buf, off)
            )
            if etype == 0x0800 and vihl == 0x45 and proto == 6 and not frag & 0x3FFF:
                self.tcp_frames += 1
                ip_end = off + 14 + total if total else end  # 0: a TSO frame captured before segmentation
                # In-order data on a synchronised flow with nothing buffered: frame straight from the file bytes.
                flow = self.flows.get(buf[off + 26 : off + 38])  # src, dst, sport, dport: the flow key
                if (
                    flow is not None
                    and self.strict  # lenient analysis goes through _feed, which contains a broken stream
                    and seq == flow.next_seq
                    and flow.synced
                    and not flow.buf
                    and not flow.ooo
                    and not offflags & 0x07  # no FIN, SYN, RST
                    and ip_end <= end
                ):
                    pstart = off + 34 + ((offflags >> 12) * 4)
                    if ip_end > pstart:
                        flow.next_seq = (seq + ip_end - pstart) & _U32
                        pos = self._frame(flow, buf, pstart, ip_end, number, ts)
                        flow.consumed += pos - pstart
                        if pos < ip_end:
                            flow.buf = bytearray(buf[pos:ip_end])
                    return
                self._segment(number, ts, buf, end, src, dst, sport, dport, seq, offflags, off + 34, ip_end)
                return
        parsed = self._parse_ip_tcp(number, linktype, buf, off, end)
        if parsed is not None:
            self._segment(number, ts, buf, end, *parsed)

    def _parse_ip_tcp(
        self, number: int, linktype: int, buf: bytes, off: int, end: int
    ) -> tuple[bytes, bytes, int, int, int, int, int, int] | None:
        """(src, dst, sport, dport, seq, offset+flags word, TCP header offset, IP end) of any IP link type."""
        caplen = end - off
        p = off
        if linktype == LINKTYPE_ETHERNET:
            if caplen < 14:
                return None
            etype = (buf[p + 12] << 8) | buf[p + 13]
            p += 14
            while etype in (0x8100, 0x88A8, 0x9100) and p + 4 <= end:
                etype = (buf[p + 2] << 8) | buf[p + 3]
                p += 4
            if etype != 0x0800 and etype != 0x86DD:
                return None
        elif linktype == LINKTYPE_LINUX_SLL:
            if caplen < 16:
                return None
            p += 16
        elif linktype == LINKTYPE_LINUX_SLL2:
            if caplen < 20:
                return None
            p += 20
        elif linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
            p += 4
        if p >= end:
            return None
        self.tcp_frames += 1
        version = buf[p] >> 4
        if version == 4:
            if p + 20 > end:
                return None
            ihl = (buf[p] & 0x0F) * 4
            total, frag, proto = struct.unpack_from(">2xH2xHxB", buf, p)
            if proto != 6:
                return None
            if frag & 0x3FFF:
                if not self.fragment_warned:
                    self.fragment_warned = True
                    self.warnings.append(f"frame {number}: IP fragments are not reassembled; skipped")
                return None
            src = buf[p + 12 : p + 16]
            dst = buf[p + 16 : p + 20]
            ip_end = p + total if total else end
            t = p + ihl
        elif version == 6:
            if p + 40 > end:
                return None
            plen = (buf[p + 4] << 8) | buf[p + 5]
            nh = buf[p + 6]
            src = buf[p + 8 : p + 24]
            dst = buf[p + 24 : p + 40]
            ip_end = p + 40 + plen
            t = p + 40
            while nh in (0, 43, 60) and t + 2 <= end:
                nh, hlen = buf[t], (buf[t + 1] + 1) * 8
                t += hlen
            if nh != 6:
                return None
        else:
            return None
        if t + 20 > end:
            return None
        sport, dport, seq, _ack, offflags = struct.unpack_from(">HHIIH", buf, t)
        return src, dst, sport, dport, seq, offflags, t, ip_end

    def _segment(
        self,
        number: int,
        ts: float,
        buf: bytes,
        end: int,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        seq: int,
        offflags: int,
        t: int,
        ip_end: int,
    ) -> None:
        ports = self.ports
        if sport not in ports and dport not in ports:
            return
        pstart = t + ((offflags >> 12) * 4)
        pend = ip_end
        if pend > end:
            raise CaptureError(
                f"TCP segment {_addr(src)}:{sport} -> {_addr(dst)}:{dport} was cut by the snapshot length "
                f"({end - pstart} of {pend - pstart} payload bytes captured); the USB/IP stream cannot be "
                "reassembled (capture with -s 0)",
                frame=number,
                path=self.analysis.source,
            )
        flags = offflags & 0x3F
        flow = self.flows.get(bytes(src) + bytes(dst) + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"))
        if flow is None:
            flow = self._new_flow(src, sport, dst, dport)
        if flags & 0x02:  # SYN
            flow.next_seq = (seq + 1) & _U32
            flow.from_start = True
            flow.synced = True
            seq = (seq + 1) & _U32
        if pend <= pstart:
            return
        if flow.next_seq is None:
            flow.next_seq = seq
        delta = (seq - flow.next_seq) & _U32
        if delta == 0:
            self._feed(flow, buf, pstart, pend, number, ts)
        elif delta >= 0x80000000:  # old data: a retransmission, maybe overlapping new bytes
            already = 0x100000000 - delta
            if pstart + already < pend:
                self._feed(flow, buf, pstart + already, pend, number, ts)
        else:
            flow.ooo[seq] = bytes(buf[pstart:pend])
            return
        while flow.ooo:
            nxt = flow.ooo.pop(flow.next_seq, None)
            if nxt is None:
                break
            self._feed(flow, nxt, 0, len(nxt), number, ts)

    def _new_flow(self, src: bytes, sport: int, dst: bytes, dport: int) -> _Flow:
        to_server = dport in self.ports
        client, server = ((src, sport), (dst, dport)) if to_server else ((dst, dport), (src, sport))
        reverse = self.flows.get(
            bytes(dst) + bytes(src) + dport.to_bytes(2, "big") + sport.to_bytes(2, "big")
        )
        if reverse is not None:
            conn = reverse.conn
        else:
            conn = _Conn(f"{_addr(client[0])}:{client[1]} -> {_addr(server[0])}:{server[1]}")
        key = bytes(src) + bytes(dst) + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
        flow = self.flows[key] = _Flow(conn, to_server)
        self.analysis.protocols.add("usbip")
        return flow

    def _feed(
        self, flow: _Flow, buf: bytes | bytearray, start: int, end: int, number: int, ts: float
    ) -> None:
        flow.next_seq = ((flow.next_seq or 0) + (end - start)) & _U32
        if flow.conn.broken:
            return
        if self.strict:
            self._feed_stream(flow, buf, start, end, number, ts)
            return
        try:
            self._feed_stream(flow, buf, start, end, number, ts)
        except CaptureError as exc:
            flow.conn.broken = True
            flow.buf = bytearray()
            self.warnings.append(f"{exc}; the rest of this connection is skipped")

    def _feed_stream(
        self, flow: _Flow, buf: bytes | bytearray, start: int, end: int, number: int, ts: float
    ) -> None:
        if not flow.synced:
            if not _plausible(buf, start, end):
                flow.skipped += end - start
                flow.consumed += end - start
                return
            flow.synced = True
        if flow.buf:
            flow.buf += buf[start:end]
            b: bytes | bytearray = flow.buf
            pos = self._frame(flow, b, 0, len(b), number, ts)
            del flow.buf[:pos]
            flow.consumed += pos
        else:
            pos = self._frame(flow, buf, start, end, number, ts)
            flow.consumed += pos - start
            if pos < end:
                flow.buf = bytearray(buf[pos:end])

    def _frame(self, flow: _Flow, b: bytes | bytearray, pos: int, end: int, number: int, ts: float) -> int:
        """Handle every whole message in b[pos:end]; return where the first incomplete one starts."""
        conn = flow.conn
        pending = conn.pending
        transactions = self.transactions
        start = pos
        records = 0
        t: Transaction | None
        self._stream_base = flow.consumed - start  # stream offset of b[0], for error messages
        while end - pos >= 8:
            if end - pos >= 48:
                # every URB header in one unpack; for an OP message `command` is version << 16 | code
                command, seqnum, devid, direction, ep, status, length, _w7, npk, _w9, setup = (
                    _URB.unpack_from(b, pos)
                )
            else:
                command = int.from_bytes(b[pos : pos + 4], "big")
                if 1 <= command <= 4:
                    break  # a URB header still arriving
            if command <= 4:
                if command == 1:
                    size = 48
                    if direction == 0 and length > 0:
                        size += length
                    if npk > 0:
                        size += 16 * npk
                    if end - pos < size:
                        if size - 48 > _MAX_PAYLOAD:
                            self._implausible(flow, b, pos, number, "CMD_SUBMIT", seqnum, length, npk)
                        break
                    endpoint = (ep & 0x7F) | (0x80 if direction else 0)
                    if ep == 0:
                        ttype: str | None = "control"
                    elif npk > 0:
                        ttype = "isochronous"
                    else:
                        ttype = conn.ep_types.get((devid, endpoint))
                    t = Transaction(
                        "usbip",
                        "submit",
                        number,
                        ts,
                        seqnum,
                        devid >> 16,
                        devid & 0xFFFF,
                        endpoint,
                        ttype,
                        length,
                        setup if ep == 0 else None,
                        conn.name,
                        conn.busid,
                    )
                    if seqnum in pending:
                        self.warnings.append(
                            f"frame {number}: {conn.name}: seqnum {seqnum} submitted again while still pending"
                        )
                    pending[seqnum] = t
                    transactions.append(t)
                    conn.phase = "urb"
                    if ep != 0:
                        if direction == 0 and length == 31 and b[pos + 48 : pos + 52] == b"USBC":
                            self._open_cbw(t, b, pos + 48, conn.bot, devid)
                        else:
                            dev = conn.bot.get(devid)
                            if dev is not None and dev.current is not None:
                                _annotate_data(t, dev.current)
                elif command == 3:
                    actual = length
                    t = pending.get(seqnum)
                    if t is not None:
                        data_in = t.endpoint & 0x80
                    else:
                        data_in = _ret_data_follows(b, pos, end, actual, npk)
                    size = 48
                    if data_in and actual > 0:
                        size += actual
                    if npk > 0:
                        size += 16 * npk
                    if end - pos < size:
                        if size - 48 > _MAX_PAYLOAD:
                            self._implausible(flow, b, pos, number, "RET_SUBMIT", seqnum, actual, npk)
                        break
                    if t is None:
                        self.warnings.append(
                            f"frame {number}: {conn.name}: RET_SUBMIT seqnum {seqnum} answers no CMD_SUBMIT seen"
                        )
                        t = Transaction(
                            "usbip", "submit", None, None, seqnum, 0, 0, 0x80 if data_in else 0, None, 0, None,
                            conn.name, conn.busid,
                        )  # fmt: skip
                        transactions.append(t)
                    else:
                        del pending[seqnum]
                    t.response_frame = number
                    t.response_ts = ts
                    t.status = status
                    t.actual_length = actual
                    if t.endpoint == 0x80:
                        if t.setup is not None and actual > 0:
                            self._learn_descriptors(conn, t, b, pos + 48, min(actual, end - pos - 48))
                    elif t.endpoint & 0x80:
                        if actual == 13 and b[pos + 48 : pos + 52] == b"USBS":
                            devid = (t.busnum << 16) | t.devnum
                            self._close_csw(t, b, pos + 48, conn.bot.get(devid), devid)
                        elif t.bot == "data":
                            _count_data(t, conn.bot.get((t.busnum << 16) | t.devnum))
                    elif t.bot == "data":
                        _count_data(t, conn.bot.get((t.busnum << 16) | t.devnum))
                elif command == 2:
                    victim = status & 0xFFFFFFFF  # unlink_seqnum shares the first union word
                    size = 48
                    target = pending.get(victim)
                    t = Transaction(
                        "usbip",
                        "unlink",
                        number,
                        ts,
                        seqnum,
                        devid >> 16,
                        devid & 0xFFFF,
                        target.endpoint if target is not None else 0,
                        target.transfer_type if target is not None else None,
                        0,
                        None,
                        conn.name,
                        conn.busid,
                    )
                    t.unlink_seqnum = victim
                    conn.pending_unlinks[seqnum] = t
                    transactions.append(t)
                elif command == 4:
                    size = 48
                    t = conn.pending_unlinks.pop(seqnum, None)
                    if t is None:
                        self.warnings.append(
                            f"frame {number}: {conn.name}: RET_UNLINK seqnum {seqnum} answers no CMD_UNLINK seen"
                        )
                    else:
                        t.response_frame = number
                        t.response_ts = ts
                        t.status = status
                        t.actual_length = 0
                        if status == _ECONNRESET and t.unlink_seqnum is not None:
                            victim_t = pending.pop(t.unlink_seqnum, None)
                            if victim_t is not None:
                                victim_t.unlinked = True
                                victim_t.status = status
                                victim_t.actual_length = 0
                                victim_t.response_frame = number
                                victim_t.response_ts = ts
                else:
                    self._garbage(flow, b, pos, number)
            elif command >> 16 == 0x0111:
                size = self._op_message(flow, b, pos, end, number, ts)
                if size == 0:
                    break
            else:
                self._garbage(flow, b, pos, number)
            pos += size
            records += 1
        self.records += records
        if pos == start and end - pos >= 4 and not _plausible(b, pos, end):
            self._garbage(flow, b, pos, number)
        return pos

    def _op_message(
        self, flow: _Flow, b: bytes | bytearray, pos: int, end: int, number: int, ts: float
    ) -> int:
        """Handle one OP_* message; return its size, or 0 when it is not complete yet."""
        conn = flow.conn
        t: Transaction | None
        code, status = struct.unpack_from(">HI", b, pos + 2)
        if conn.phase == "urb":
            raise CaptureError(
                f"{conn.name}: OP message 0x{code:04x} after the connection switched to URB traffic "
                f"(stream offset {self._stream_base + pos})",
                frame=number,
                path=self.analysis.source,
            )
        if code == 0x8005 or code == 0x8003:  # OP_REQ_DEVLIST, OP_REQ_IMPORT
            size = 8 if code == 0x8005 else 40
            if end - pos < size:
                return 0
            busid = None
            if code == 0x8003:
                busid = bytes(b[pos + 8 : pos + 40]).split(b"\0", 1)[0].decode("ascii", "replace")
                conn.busid = busid
            t = Transaction(
                "usbip", "devlist" if code == 0x8005 else "import", number, ts, 0, 0, 0, 0, None, 0, None,
                conn.name, busid,
            )  # fmt: skip
            conn.pending_op = t
            self.transactions.append(t)
            return size
        if code == 0x0003:  # OP_REP_IMPORT
            size = 8 + (312 if status == 0 else 0)
            if end - pos < size:
                return 0
            t = conn.pending_op
            conn.pending_op = None
            if status == 0:
                busid = bytes(b[pos + 264 : pos + 296]).split(b"\0", 1)[0].decode("ascii", "replace")
                busnum, devnum = struct.unpack_from(">II", b, pos + 296)
                conn.busid = conn.busid or busid
                conn.phase = "urb"
                if t is not None:
                    t.busnum, t.devnum = busnum, devnum
            self._op_reply(t, conn, number, ts, status, "OP_REP_IMPORT")
            return size
        if code == 0x0005:  # OP_REP_DEVLIST
            ndev = 0
            size = 8 if status != 0 else 12  # a failed devlist is only op_common
            if end - pos < size:
                return 0
            if status == 0:
                ndev = struct.unpack_from(">I", b, pos + 8)[0]
            for _ in range(ndev):
                if end - pos < size + 312:
                    return 0
                size += 312 + 4 * b[pos + size + 311]
            if end - pos < size:
                return 0
            t = conn.pending_op
            conn.pending_op = None
            self._op_reply(t, conn, number, ts, status, "OP_REP_DEVLIST")
            if t is not None:
                t.actual_length = ndev
            return size
        raise CaptureError(
            f"{conn.name}: unknown USB/IP operation code 0x{code:04x} at stream offset {self._stream_base + pos}",
            frame=number,
            path=self.analysis.source,
        )

    def _op_reply(
        self, t: Transaction | None, conn: _Conn, number: int, ts: float, status: int, what: str
    ) -> None:
        if t is None:
            self.warnings.append(f"frame {number}: {conn.name}: {what} answers no request seen")
            return
        t.response_frame = number
        t.response_ts = ts
        t.status = status

    def _implausible(
        self,
        flow: _Flow,
        b: bytes | bytearray,
        pos: int,
        number: int,
        what: str,
        seqnum: int,
        length: int,
        npk: int,
    ) -> None:
        raise CaptureError(
            f"{flow.conn.name}: {what} seqnum {seqnum} at stream offset {self._stream_base + pos} announces "
            f"{length} bytes and {npk} ISO packets, beyond what USB/IP carries "
            f"({_LIMITS.max_transfer_buffer_length} bytes, {_LIMITS.max_number_of_packets} packets): "
            "not a USB/IP stream, or a corrupt one",
            frame=number,
            path=self.analysis.source,
        )

    def _garbage(self, flow: _Flow, b: bytes | bytearray, pos: int, number: int) -> None:
        raise CaptureError(
            f"{flow.conn.name}: bytes at stream offset {self._stream_base + pos} are not a USB/IP message "
            f"({bytes(b[pos : pos + 8]).hex(' ')})",
            frame=number,
            path=self.analysis.source,
        )

    def _learn_descriptors(self, conn: _Conn, t: Transaction, b: bytes | bytearray, off: int, n: int) -> None:
        """Endpoint types from a GET_DESCRIPTOR(CONFIGURATION) answer: USB/IP does not carry them otherwise."""
        setup = t.setup
        if setup is None or setup[0] != 0x80 or setup[1] != 6 or setup[3] != 2:
            return
        devid = (t.busnum << 16) | t.devnum
        i = 0
        while i + 2 <= n:
            blen = b[off + i]
            if blen < 2:
                break
            if b[off + i + 1] == 5 and blen >= 7 and i + 4 <= n:
                address, attributes = b[off + i + 2], b[off + i + 3]
                conn.ep_types[(devid, address)] = _EP_TRANSFER_TYPES[attributes & 3]
            i += blen


def _annotate_data(t: Transaction, cmd: ScsiCommand) -> None:
    t.bot = "data"
    t.bot_tag = cmd.tag
    t.scsi_opcode = cmd.opcode
    t.scsi_service_action = cmd.service_action


def _count_data(t: Transaction, dev: _BotDevice | None) -> None:
    if dev is None or t.bot_tag is None:
        return
    cmd = dev.by_tag.get(t.bot_tag)
    if cmd is not None and t.actual_length:
        cmd.data_bytes += t.actual_length


def _addr(raw: bytes) -> str:
    if len(raw) == 4:
        return ".".join(str(x) for x in raw)
    import ipaddress

    return f"[{ipaddress.IPv6Address(bytes(raw))}]"


# --- entry points --------------------------------------------------------------------------------------------------


def _frames_from_packets(packets: Iterable[Any]) -> Iterator[RawFrame]:
    """Frames of a scapy packet list (rdpcap, sniff), with the link type of each packet's first layer."""
    from scapy.config import conf
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import CookedLinux, Ether

    from captures.layers.usbmon import USBmon, USBmonMmapped

    for number, pkt in enumerate(packets, 1):
        if isinstance(pkt, USBmonMmapped):
            linktype = LINKTYPE_USB_LINUX_MMAPPED
        elif isinstance(pkt, USBmon):
            linktype = LINKTYPE_USB_LINUX
        elif isinstance(pkt, Ether):
            linktype = LINKTYPE_ETHERNET
        elif isinstance(pkt, CookedLinux):
            linktype = LINKTYPE_LINUX_SLL
        elif isinstance(pkt, IP | IPv6):
            linktype = LINKTYPE_RAW
        else:
            found = conf.l2types.layer2num.get(type(pkt))
            if found is None:
                raise CaptureError(
                    f"packet of type {type(pkt).__name__} has no link type vusb reads", frame=number
                )
            linktype = found
        raw = bytes(pkt)
        yield (number, linktype, float(pkt.time), raw, 0, len(raw), len(raw), False)


def _until_truncation(frames: Iterator[RawFrame], warnings: list[str]) -> Iterator[RawFrame]:
    """The frames of a capture up to where the file was cut short; the cut becomes a warning."""
    try:
        yield from frames
    except TruncatedCaptureError as exc:
        warnings.append(
            f"{exc}; the capture was cut short (a recording killed mid-write?): analysed up to there"
        )


def analyze(
    source: str | os.PathLike[str] | bytes | Iterable[Any],
    *,
    ports: Iterable[int] = (USBIP_PORT,),
    strict: bool = True,
) -> Analysis:
    """Pair a capture: a pcap/pcapng path, its bytes, or a list of scapy packets.

    Raises CaptureError (naming the frame) for files that are not captures, truncated blocks, link types that
    carry neither usbmon nor IP, and USB/IP streams that break the protocol. With `strict=False` a USB/IP
    connection that breaks the protocol (a peer that sent garbage, say) becomes a warning and the rest of that
    connection is skipped, while the other connections are still paired, and a file cut short inside its last
    record (a recorder killed mid-write) is analysed up to the cut.
    """
    if isinstance(source, str | os.PathLike | bytes | bytearray | memoryview):
        data, name = load(source)
        pairer = _Pairer(name, ports, strict=strict)
        frames = iter_frames(data, name)
        return pairer.run(frames if strict else _until_truncation(frames, pairer.warnings))
    return _Pairer("<packets>", ports, strict=strict).run(_frames_from_packets(source))


def pair_transactions(
    source: str | os.PathLike[str] | bytes | Iterable[Any], *, ports: Iterable[int] = (USBIP_PORT,)
) -> list[Transaction]:
    """The transactions of a capture, in the order their requests were seen."""
    return analyze(source, ports=ports).transactions


# --- summaries -----------------------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) of already sorted values, linearly interpolated (numpy's default)."""
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def summarize(
    transactions: list[Transaction], scsi_commands: list[ScsiCommand] | None = None
) -> dict[str, Any]:
    """Counts, bytes, errors and latency percentiles (seconds) of a list of transactions."""
    urbs = [t for t in transactions if t.kind == "submit"]
    latencies = sorted(lat for t in urbs if (lat := t.latency) is not None)
    errors: dict[str, int] = {}
    for t in urbs:
        if t.failed:
            errors[t.status_text] = errors.get(t.status_text, 0) + 1
    bytes_in = sum(t.actual_length or 0 for t in urbs if t.endpoint & 0x80 and not t.failed)
    bytes_out = sum(t.actual_length or 0 for t in urbs if not t.endpoint & 0x80 and not t.failed)
    endpoints: dict[str, dict[str, int]] = {}
    for t in urbs:
        key = f"{t.device} 0x{t.endpoint:02x}"
        entry = endpoints.setdefault(key, {"urbs": 0, "bytes": 0, "errors": 0})
        entry["urbs"] += 1
        entry["bytes"] += t.actual_length or 0
        entry["errors"] += 1 if t.failed else 0
    summary: dict[str, Any] = {
        "urbs": len(urbs),
        "completed": sum(1 for t in urbs if t.complete),
        "pending": sum(1 for t in urbs if not t.complete),
        "unlinked": sum(1 for t in urbs if t.unlinked),
        "errors": sum(errors.values()),
        "errors_by_status": errors,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "latency": {
            "count": len(latencies),
            "p50": percentile(latencies, 50),
            "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99),
            "max": latencies[-1] if latencies else None,
        },
        "endpoints": endpoints,
    }
    if scsi_commands:
        ops: dict[str, int] = {}
        for c in scsi_commands:
            name = c.name or "?"
            ops[name] = ops.get(name, 0) + 1
        scsi_lat = sorted(lat for c in scsi_commands if (lat := c.latency) is not None)
        summary["scsi"] = {
            "commands": len(scsi_commands),
            "failed": sum(1 for c in scsi_commands if c.csw_status not in (None, 0)),
            "by_opcode": ops,
            "latency": {
                "p50": percentile(scsi_lat, 50),
                "p90": percentile(scsi_lat, 90),
                "p99": percentile(scsi_lat, 99),
            },
        }
    return summary
