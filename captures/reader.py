"""Fast reading of pcap and pcapng files: the container layer under `vusb dissect` and transaction pairing.

Why not scapy's `rdpcap`: it builds a Packet per frame (tens of microseconds each), while pairing a 100k-record
capture must stay well under a microsecond of container work per frame. This module only walks blocks with
`struct` and hands out offsets into one bytes object; the protocol layers (captures/layers/, scapy) are for rich
dissection of the few frames a person looks at.

Every problem is a `CaptureError` that names the frame number (1-based, as Wireshark counts) and the byte offset.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

from captures.errors import CaptureError, TruncatedCaptureError

# Link-layer header types (https://www.tcpdump.org/linktypes.html) that vusb understands.
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW_OLD = 12  # DLT_RAW on OpenBSD-ish systems; pcap files use 101, some tools write 12
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_USB_LINUX = 189
LINKTYPE_USB_LINUX_MMAPPED = 220
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

LINKTYPE_NAMES = {
    LINKTYPE_NULL: "NULL",
    LINKTYPE_ETHERNET: "ETHERNET",
    LINKTYPE_RAW_OLD: "RAW",
    LINKTYPE_RAW: "RAW",
    LINKTYPE_LOOP: "LOOP",
    LINKTYPE_LINUX_SLL: "LINUX_SLL",
    LINKTYPE_USB_LINUX: "USB_LINUX",
    LINKTYPE_USB_LINUX_MMAPPED: "USB_LINUX_MMAPPED",
    LINKTYPE_IPV4: "IPV4",
    LINKTYPE_IPV6: "IPV6",
    LINKTYPE_LINUX_SLL2: "LINUX_SLL2",
    249: "USBPCAP",
    266: "USB_DARWIN",
    186: "USB_FREEBSD",
}

_PCAP_MAGIC_US = 0xA1B2C3D4
_PCAP_MAGIC_NS = 0xA1B23C4D
_PCAPNG_SHB = 0x0A0D0D0A
_PCAPNG_BOM = 0x1A2B3C4D
_PCAPNG_IDB = 0x00000001
_PCAPNG_PB = 0x00000002  # obsolete Packet Block
_PCAPNG_SPB = 0x00000003
_PCAPNG_EPB = 0x00000006
_OPT_IF_TSRESOL = 9
_OPT_IF_TSOFFSET = 14

# One frame as the hot loops want it: (number, linktype, timestamp in seconds, buffer, offset of the packet bytes
# in that buffer, captured length, original length, big_endian). For a file the buffer is the whole file, never
# copied. `big_endian` is the byte order of the file (pcap) or section (pcapng): Linux usbmon pseudo-headers are
# in the writer's host order, i.e. the file's order.
RawFrame = tuple[int, int, float, bytes, int, int, int, bool]


def linktype_name(linktype: int) -> str:
    return LINKTYPE_NAMES.get(linktype, "unknown")


def load(source: str | os.PathLike[str] | bytes | bytearray | memoryview) -> tuple[bytes, str]:
    """The whole capture as one bytes object plus a name for messages; a path is read, bytes are used as is."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), "<bytes>"
    path = Path(source)
    try:
        return path.read_bytes(), str(path)
    except OSError as exc:
        raise CaptureError(f"cannot read capture: {exc.strerror or exc}", path=str(path)) from exc


def iter_frames(data: bytes, path: str | None = None) -> Iterator[RawFrame]:
    """Every packet of a pcap or pcapng capture held in `data`, in file order."""
    if len(data) == 0:
        raise CaptureError("empty file: not a pcap or pcapng capture", path=path)
    if len(data) < 4:
        raise CaptureError(f"{len(data)}-byte file: too short for a pcap or pcapng header", path=path)
    magic_le = struct.unpack_from("<I", data, 0)[0]
    if magic_le == _PCAPNG_SHB:
        return _iter_pcapng(data, path)
    if magic_le in (_PCAP_MAGIC_US, _PCAP_MAGIC_NS):
        return _iter_pcap(data, path, "<")
    magic_be = struct.unpack_from(">I", data, 0)[0]
    if magic_be in (_PCAP_MAGIC_US, _PCAP_MAGIC_NS):
        return _iter_pcap(data, path, ">")
    raise CaptureError(f"not a pcap or pcapng capture (file starts with {data[:8].hex(' ')})", path=path)


def _iter_pcap(data: bytes, path: str | None, bo: str) -> Iterator[RawFrame]:
    if len(data) < 24:
        raise CaptureError(f"pcap file header is truncated ({len(data)} of 24 bytes)", path=path)
    magic, _major, _minor, _zone, _sigfigs, _snaplen, network = struct.unpack_from(bo + "IHHiIII", data, 0)
    scale = 1e-9 if magic == _PCAP_MAGIC_NS else 1e-6
    linktype = network & 0x03FFFFFF  # the upper bits carry FCS information
    big_endian = bo == ">"
    rec = struct.Struct(bo + "IIII")
    unpack_rec = rec.unpack_from
    end = len(data)
    off = 24
    number = 0
    while off < end:
        number += 1
        if off + 16 > end:
            raise TruncatedCaptureError(
                f"pcap record header at byte {off} is truncated ({end - off} of 16 bytes)",
                frame=number,
                path=path,
            )
        ts_sec, ts_frac, caplen, origlen = unpack_rec(data, off)
        off += 16
        if off + caplen > end:
            raise TruncatedCaptureError(
                f"pcap record at byte {off - 16} is truncated: {caplen} bytes captured, {end - off} left in file",
                frame=number,
                path=path,
            )
        if caplen > 0x10000000:
            raise CaptureError(f"pcap record claims an implausible length {caplen}", frame=number, path=path)
        yield (number, linktype, ts_sec + ts_frac * scale, data, off, caplen, origlen, big_endian)
        off += caplen


class _Interface:
    __slots__ = ("linktype", "scale", "tsoffset")

    def __init__(self, linktype: int, scale: float, tsoffset: int) -> None:
        self.linktype = linktype
        self.scale = scale
        self.tsoffset = tsoffset


def _parse_idb_options(data: bytes, off: int, end: int, bo: str) -> tuple[float, int]:
    scale = 1e-6
    tsoffset = 0
    while off + 4 <= end:
        code, length = struct.unpack_from(bo + "HH", data, off)
        off += 4
        if code == 0:
            break
        if off + length > end:
            break
        if code == _OPT_IF_TSRESOL and length >= 1:
            resol = data[off]
            scale = 2.0 ** -(resol & 0x7F) if resol & 0x80 else 10.0**-resol
        elif code == _OPT_IF_TSOFFSET and length >= 8:
            tsoffset = struct.unpack_from(bo + "q", data, off)[0]
        off += (length + 3) & ~3
    return scale, tsoffset


def _iter_pcapng(data: bytes, path: str | None) -> Iterator[RawFrame]:
    end = len(data)
    off = 0
    number = 0
    bo = "<"
    head = struct.Struct("<II")
    epb = struct.Struct("<IIIII")
    interfaces: list[_Interface] = []
    while off < end:
        if off + 12 > end:
            raise TruncatedCaptureError(
                f"pcapng block at byte {off} is truncated ({end - off} bytes left, a block has at least 12)",
                frame=number + 1,
                path=path,
            )
        btype, blen = head.unpack_from(data, off)
        if btype == _PCAPNG_EPB and not blen & 3 and blen >= 32 and off + blen <= end:
            # the hot path: an enhanced packet block in a well-formed file
            number += 1
            ifid, ts_hi, ts_lo, caplen, origlen = epb.unpack_from(data, off + 8)
            if ifid < len(interfaces) and caplen <= blen - 32:
                iface = interfaces[ifid]
                yield (
                    number,
                    iface.linktype,
                    ((ts_hi << 32) | ts_lo) * iface.scale + iface.tsoffset,
                    data,
                    off + 28,
                    caplen,
                    origlen,
                    bo == ">",
                )
                off += blen
                continue
            number -= 1  # let the careful path below report what is wrong
        if btype == _PCAPNG_SHB:  # the type reads the same in both byte orders
            bom = data[off + 8 : off + 12]
            if bom == b"\x4d\x3c\x2b\x1a":
                bo = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                bo = ">"
            else:
                raise CaptureError(
                    f"pcapng section header at byte {off} has a bad byte-order magic {bom.hex()}",
                    frame=number + 1,
                    path=path,
                )
            head = struct.Struct(bo + "II")
            epb = struct.Struct(bo + "IIIII")
            interfaces = []
            btype, blen = head.unpack_from(data, off)
        if blen < 12 or blen % 4:
            raise CaptureError(
                f"pcapng block at byte {off} has an invalid length {blen} (must be >= 12 and a multiple of 4)",
                frame=number + 1,
                path=path,
            )
        if off + blen > end:
            raise TruncatedCaptureError(
                f"pcapng block at byte {off} is truncated: {blen} bytes long, {end - off} left in file",
                frame=number + 1,
                path=path,
            )
        body = off + 8
        bend = off + blen - 4
        if btype == _PCAPNG_EPB:
            number += 1
            if bend - body < 20:
                raise CaptureError(
                    f"enhanced packet block at byte {off} is too short", frame=number, path=path
                )
            ifid, ts_hi, ts_lo, caplen, origlen = epb.unpack_from(data, body)
            if ifid >= len(interfaces):
                raise CaptureError(
                    f"enhanced packet block at byte {off} names interface {ifid}, "
                    f"but only {len(interfaces)} interface(s) were described",
                    frame=number,
                    path=path,
                )
            if body + 20 + caplen > bend:
                raise CaptureError(
                    f"enhanced packet block at byte {off} claims {caplen} captured bytes but holds "
                    f"{bend - body - 20}",
                    frame=number,
                    path=path,
                )
            iface = interfaces[ifid]
            ts = ((ts_hi << 32) | ts_lo) * iface.scale + iface.tsoffset
            yield (number, iface.linktype, ts, data, body + 20, caplen, origlen, bo == ">")
        elif btype == _PCAPNG_SPB:
            number += 1
            if not interfaces:
                raise CaptureError(
                    f"simple packet block at byte {off} before any interface description",
                    frame=number,
                    path=path,
                )
            origlen = struct.unpack_from(bo + "I", data, body)[0]
            caplen = min(origlen, bend - body - 4)
            yield (number, interfaces[0].linktype, 0.0, data, body + 4, caplen, origlen, bo == ">")
        elif btype == _PCAPNG_IDB:
            if bend - body < 8:
                raise CaptureError(
                    f"interface description block at byte {off} is too short", frame=number + 1, path=path
                )
            linktype = struct.unpack_from(bo + "H", data, body)[0]
            scale, tsoffset = _parse_idb_options(data, body + 8, bend, bo)
            interfaces.append(_Interface(linktype, scale, tsoffset))
        elif btype == _PCAPNG_PB:
            number += 1
            ifid, _drops, ts_hi, ts_lo, caplen, origlen = struct.unpack_from(bo + "HHIIII", data, body)
            if ifid >= len(interfaces) or body + 20 + caplen > bend:
                raise CaptureError(f"packet block at byte {off} is inconsistent", frame=number, path=path)
            iface = interfaces[ifid]
            ts = ((ts_hi << 32) | ts_lo) * iface.scale + iface.tsoffset
            yield (number, iface.linktype, ts, data, body + 20, caplen, origlen, bo == ">")
        # Every other block (name resolution, statistics, decryption secrets, custom) carries no packet.
        off += blen
