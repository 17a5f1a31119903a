"""Synthetic captures: pcap/pcapng bytes of USB/IP sessions and usbmon records, built with `struct` alone.

For tests, which need captures whose every byte is known (and odd ones: messages split anywhere, several per
segment, big-endian files), and for benchmarks, which need 100k records in well under a second. USB/IP messages
come from the core codec (`emulator.usbip.pack`), so a synthetic USB/IP stream is byte for byte what vusb's
server and client send; around them, minimal but valid Ethernet/IPv4/TCP headers (IPv4 header checksum set, TCP
checksum left 0, which tshark does not verify by default) from `captures.wire`, which `captures.record` shares. usbmon records follow `struct usbmon_packet` of
Documentation/usb/usbmon.rst.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct
from collections.abc import Iterable, Iterator, Sequence

from captures import wire
from captures.reader import LINKTYPE_ETHERNET, LINKTYPE_USB_LINUX, LINKTYPE_USB_LINUX_MMAPPED
from emulator.usbip import CmdSubmit, RetSubmit, pack
from emulator.usbip.constants import USBIP_DIR_IN, USBIP_DIR_OUT, USBIP_PORT

Frame = tuple[float, bytes]  # (timestamp in seconds, link-layer bytes)


# --- containers ----------------------------------------------------------------------------------------------------


def pcap(
    frames: Iterable[Frame],
    linktype: int,
    *,
    big_endian: bool = False,
    nanoseconds: bool = False,
    snaplen: int = 262144,
) -> bytes:
    """A classic libpcap file."""
    bo = ">" if big_endian else "<"
    magic = 0xA1B23C4D if nanoseconds else 0xA1B2C3D4
    scale = 1_000_000_000 if nanoseconds else 1_000_000
    parts = [struct.pack(bo + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)]
    rec = struct.Struct(bo + "IIII")
    for ts, data in frames:
        whole = int(ts)
        frac = round((ts - whole) * scale)
        if frac >= scale:
            whole, frac = whole + 1, frac - scale
        caplen = min(len(data), snaplen)
        parts.append(rec.pack(whole, frac, caplen, len(data)))
        parts.append(data[:caplen])
    return b"".join(parts)


def pcapng(
    frames: Iterable[Frame],
    linktype: int,
    *,
    big_endian: bool = False,
    tsresol: int = 6,
    snaplen: int = 262144,
) -> bytes:
    """A pcapng file with one section and one interface (if_tsresol = 10^-tsresol)."""
    bo = ">" if big_endian else "<"
    parts = [
        wire.section_header(bo=bo),
        wire.interface_description(linktype, snaplen, [(wire.IF_TSRESOL, bytes([tsresol]))], bo=bo),
    ]
    scale = 10**tsresol
    for ts, data in frames:
        parts.append(wire.enhanced_packet(round(ts * scale), data, caplen=snaplen, bo=bo))
    return b"".join(parts)


# --- usbmon --------------------------------------------------------------------------------------------------------

XFER_ISO, XFER_INTERRUPT, XFER_CONTROL, XFER_BULK = 0, 1, 2, 3


def usbmon_record(
    *,
    urb_id: int,
    event: str,
    xfer_type: int,
    epnum: int,
    devnum: int,
    busnum: int = 1,
    ts: float = 0.0,
    status: int = 0,
    length: int | None = None,
    data: bytes = b"",
    setup: bytes | None = None,
    flag_data: int | None = None,
    mmapped: bool = False,
    iso_descriptors: Sequence[tuple[int, int, int]] = (),
    error_count: int = 0,
    interval: int = 0,
    start_frame: int = 0,
    xfer_flags: int = 0,
    big_endian: bool = False,
) -> bytes:
    """One usbmon record (struct usbmon_packet, 48 or 64 bytes, then ISO descriptors, then data).

    `length` defaults to len(data); `flag_data` to 0 when data is present, else '<' for an IN submission and
    '>' for an OUT completion (what the kernel writes, usbmon.rst); ISO descriptors are (status, offset, length).
    """
    bo = ">" if big_endian else "<"
    if length is None:
        length = len(data)
    if flag_data is None:
        flag_data = 0 if data else (ord("<") if epnum & 0x80 else ord(">"))
    if setup is not None:
        flag_setup, union = 0, setup
    else:
        flag_setup = ord("-")
        union = (
            struct.pack(bo + "ii", error_count, len(iso_descriptors)) if xfer_type == XFER_ISO else bytes(8)
        )
    sec = int(ts)
    usec = round((ts - sec) * 1_000_000)
    head = struct.pack(
        bo + "QBBBBHBBqiiII8s",
        urb_id,
        ord(event),
        xfer_type,
        epnum,
        devnum,
        busnum,
        flag_setup,
        flag_data,
        sec,
        usec,
        status,
        length,
        len(data),
        union,
    )
    if not mmapped:
        return head + data
    head += struct.pack(bo + "iiII", interval, start_frame, xfer_flags, len(iso_descriptors))
    isos = b"".join(struct.pack(bo + "iIII", st, off, ln, 0) for st, off, ln in iso_descriptors)
    return head + isos + data


# --- TCP/IP around USB/IP ---------------------------------------------------------------------------------------


class TcpConnection(wire.TcpFrames):
    """Frames of one TCP connection between a client and a USB/IP server, with consistent sequence numbers
    (IPv4 only; every frame, SYN included, acknowledges what the other side sent)."""

    def __init__(
        self,
        client: tuple[str, int] = ("10.0.0.2", 40000),
        server: tuple[str, int] = ("10.0.0.1", USBIP_PORT),
        *,
        client_isn: int = 1000,
        server_isn: int = 5000,
    ) -> None:
        if ipaddress.ip_address(client[0]).version != 4 or ipaddress.ip_address(server[0]).version != 4:
            raise ValueError("TcpConnection builds IPv4 frames")
        super().__init__(client, server, client_isn=client_isn, server_isn=server_isn)

    def frame(
        self, to_server: bool, payload: bytes = b"", flags: int = 0x18, seq: int | None = None
    ) -> bytes:
        """One Ethernet/IPv4/TCP frame (flags: 0x18 PSH|ACK, 0x02 SYN, 0x12 SYN|ACK, 0x11 FIN|ACK)."""
        return self.headers(to_server, len(payload), flags, seq, ack=self.seq[not to_server]) + payload

    def handshake(self) -> list[bytes]:
        frames = [self.frame(True, flags=0x02), self.frame(False, flags=0x12)]
        self.seq[True] += 1
        self.seq[False] += 1
        frames.append(self.frame(True, flags=0x10))
        return frames

    def send(self, to_server: bool, payload: bytes, cuts: Sequence[int] = ()) -> list[bytes]:
        """Frames carrying `payload` in order, split at the given offsets (each cut is an offset into payload)."""
        frames = []
        edges = [0, *sorted({c for c in cuts if 0 < c < len(payload)}), len(payload)]
        for a, b in itertools.pairwise(edges):
            frames.append(self.frame(to_server, payload[a:b]))
            self.seq[to_server] += b - a
        return frames


# --- ready-made sessions (tests, benchmarks) ----------------------------------------------------------------------

_DEVICE_DESCRIPTOR = bytes.fromhex("12 01 0002 00 00 00 40 6b1d 0401 0001 01 02 03 01")


def _cbw(tag: int, length: int, data_in: bool, cdb: bytes) -> bytes:
    return (
        struct.pack("<IIIBBB", 0x43425355, tag, length, 0x80 if data_in else 0, 0, len(cdb))
        + cdb
        + bytes(16 - len(cdb))
    )


def _csw(tag: int, residue: int = 0, status: int = 0) -> bytes:
    return struct.pack("<IIIB", 0x53425355, tag, residue, status)


def _read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def usbip_mass_storage_frames(
    commands: int, *, block_size: int = 512, blocks: int = 8, devid: int = 0x00010002, start: float = 1.7e9
) -> Iterator[Frame]:
    """A USB/IP session: import, then GET_DESCRIPTOR(device), then `commands` READ(10) over BOT (CBW, data, CSW),
    one message per segment. About 3 CMD/RET pairs (6 messages) per command."""
    conn = TcpConnection()
    ts = start
    step = 1e-5
    for f in conn.handshake():
        ts += step
        yield ts, f
    seq = 0

    def exchange(cmd: CmdSubmit, ret: RetSubmit) -> Iterator[Frame]:
        nonlocal ts
        for f in conn.send(True, pack(cmd)):
            ts += step
            yield ts, f
        for f in conn.send(False, pack(ret)):
            ts += step
            yield ts, f

    setup = bytes.fromhex("8006000100001200")
    seq += 1
    yield from exchange(
        CmdSubmit(
            seqnum=seq, devid=devid, direction=USBIP_DIR_IN, ep=0, transfer_buffer_length=18, setup=setup
        ),
        RetSubmit(seqnum=seq, actual_length=18, transfer_buffer=_DEVICE_DESCRIPTOR),
    )
    payload = bytes(range(256)) * (block_size * blocks // 256 + 1)
    data = payload[: block_size * blocks]
    for i in range(commands):
        tag = i + 1
        cbw = _cbw(tag, len(data), True, _read10(i * blocks, blocks))
        seq += 1
        yield from exchange(
            CmdSubmit(
                seqnum=seq,
                devid=devid,
                direction=USBIP_DIR_OUT,
                ep=2,
                transfer_buffer_length=31,
                transfer_buffer=cbw,
            ),
            RetSubmit(seqnum=seq, actual_length=31),
        )
        seq += 1
        yield from exchange(
            CmdSubmit(
                seqnum=seq, devid=devid, direction=USBIP_DIR_IN, ep=1, transfer_buffer_length=len(data)
            ),
            RetSubmit(seqnum=seq, actual_length=len(data), transfer_buffer=data),
        )
        seq += 1
        yield from exchange(
            CmdSubmit(seqnum=seq, devid=devid, direction=USBIP_DIR_IN, ep=1, transfer_buffer_length=13),
            RetSubmit(seqnum=seq, actual_length=13, transfer_buffer=_csw(tag)),
        )


def usbmon_mass_storage_records(
    commands: int,
    *,
    mmapped: bool = False,
    busnum: int = 1,
    devnum: int = 2,
    block_size: int = 512,
    blocks: int = 8,
    data_snaplen: int | None = None,
    start: float = 1.7e9,
) -> Iterator[Frame]:
    """usbmon records of GET_DESCRIPTOR(device) then `commands` READ(10) over BOT: 6 records per command.
    `data_snaplen` truncates captured data the way usbmon's buffer does (len_cap < length)."""
    ts = start
    step = 1e-5
    urb = 0xFFFF_8880_0000_0000

    def rec(
        event: str, urb_id: int, xfer: int, ep: int, length: int, data: bytes = b"", **kw: object
    ) -> Frame:
        nonlocal ts
        ts += step
        if data_snaplen is not None:
            data = data[:data_snaplen]
        raw = usbmon_record(
            urb_id=urb_id, event=event, xfer_type=xfer, epnum=ep, devnum=devnum, busnum=busnum, ts=ts,
            length=length, data=data, mmapped=mmapped, **kw,  # type: ignore[arg-type]
        )  # fmt: skip
        return ts, raw

    setup = bytes.fromhex("8006000100001200")
    yield rec("S", urb, XFER_CONTROL, 0x80, 18, setup=setup, status=-115)
    yield rec("C", urb, XFER_CONTROL, 0x80, 18, _DEVICE_DESCRIPTOR)
    payload = bytes(range(256)) * (block_size * blocks // 256 + 1)
    data = payload[: block_size * blocks]
    for i in range(commands):
        tag = i + 1
        a, b, c = urb + 0x100 * (3 * i + 1), urb + 0x100 * (3 * i + 2), urb + 0x100 * (3 * i + 3)
        yield rec(
            "S", a, XFER_BULK, 0x02, 31, _cbw(tag, len(data), True, _read10(i * blocks, blocks)), status=-115
        )
        yield rec("C", a, XFER_BULK, 0x02, 31)
        yield rec("S", b, XFER_BULK, 0x81, len(data), status=-115)
        yield rec("C", b, XFER_BULK, 0x81, len(data), data)
        yield rec("S", c, XFER_BULK, 0x81, 13, status=-115)
        yield rec("C", c, XFER_BULK, 0x81, 13, _csw(tag))


def usbip_capture(commands: int, *, ng: bool = True) -> bytes:
    frames = usbip_mass_storage_frames(commands)
    return pcapng(frames, LINKTYPE_ETHERNET) if ng else pcap(frames, LINKTYPE_ETHERNET)


def usbmon_capture(commands: int, *, mmapped: bool = True, ng: bool = True) -> bytes:
    linktype = LINKTYPE_USB_LINUX_MMAPPED if mmapped else LINKTYPE_USB_LINUX
    frames = usbmon_mass_storage_records(commands, mmapped=mmapped)
    return pcapng(frames, linktype) if ng else pcap(frames, linktype)
