"""Bytes that go into capture files: pcapng blocks, and the Ethernet/IP/TCP headers around USB/IP.

Shared by `captures.synth` (made-up sessions for tests and benchmarks) and `captures.record` (real sessions, as
they happen), so both write the same framing. Everything is `struct` and returns bytes; nothing here touches a
file. Layouts: pcapng per draft-ietf-opsawg-pcapng (block = type, total length, body padded to 32 bits, options,
total length again); Ethernet II, IPv4 (RFC 791, header checksum set) or IPv6 (RFC 8200), TCP (RFC 9293, checksum
left 0, which Wireshark does not verify by default).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable

# --- pcapng ----------------------------------------------------------------------------------------------------

SHB_TYPE = 0x0A0D0D0A
IDB_TYPE = 0x00000001
EPB_TYPE = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D

OPT_ENDOFOPT = 0
OPT_COMMENT = 1
SHB_HARDWARE = 2
SHB_OS = 3
SHB_USERAPPL = 4
IF_NAME = 2
IF_DESCRIPTION = 3
IF_TSRESOL = 9

Option = tuple[int, bytes]


def block(btype: int, body: bytes, bo: str = "<") -> bytes:
    """One pcapng block: the body is padded to 32 bits and framed by the total length twice."""
    body += b"\0" * (-len(body) % 4)
    length = len(body) + 12
    return struct.pack(bo + "II", btype, length) + body + struct.pack(bo + "I", length)


def options(items: Iterable[Option], bo: str = "<") -> bytes:
    """An options list (each value padded to 32 bits) closed by opt_endofopt; b"" when there are none."""
    out = [
        struct.pack(bo + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4) for code, value in items
    ]
    if not out:
        return b""
    return b"".join(out) + struct.pack(bo + "HH", OPT_ENDOFOPT, 0)


def text(value: str) -> bytes:
    """A string option's value: UTF-8, no terminating NUL (the spec's rule)."""
    return value.encode("utf-8", "replace")


def section_header(items: Iterable[Option] = (), bo: str = "<") -> bytes:
    """A Section Header Block, version 1.0, section length unknown (-1)."""
    return block(SHB_TYPE, struct.pack(bo + "IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + options(items, bo), bo)


def interface_description(linktype: int, snaplen: int, items: Iterable[Option] = (), bo: str = "<") -> bytes:
    return block(IDB_TYPE, struct.pack(bo + "HHI", linktype, 0, snaplen) + options(items, bo), bo)


def enhanced_packet(
    stamp: int,
    data: bytes,
    *,
    interface: int = 0,
    caplen: int | None = None,
    items: Iterable[Option] = (),
    bo: str = "<",
) -> bytes:
    """An Enhanced Packet Block; `stamp` is in units of the interface's if_tsresol."""
    cap = len(data) if caplen is None else min(caplen, len(data))
    body = struct.pack(bo + "IIIII", interface, stamp >> 32, stamp & 0xFFFFFFFF, cap, len(data)) + data[:cap]
    body += b"\0" * (-len(body) % 4)
    return block(EPB_TYPE, body + options(items, bo), bo)


# --- Ethernet / IP / TCP -------------------------------------------------------------------------------------------

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_PSH = 0x08
TCP_ACK = 0x10

MAX_SEGMENT = 65495
"""Largest TCP payload in one frame: an IPv4 datagram is at most 65535 bytes, less 20 of IP and 20 of TCP header."""

_MAC_SERVER = b"\x02\0\0\0\0\x01"
_MAC_CLIENT = b"\x02\0\0\0\0\x02"
_ETH_IPV4 = b"\x08\x00"
_ETH_IPV6 = b"\x86\xdd"
_IPV4 = struct.Struct(">BBHHHBBH4s4s")
_IPV6 = struct.Struct(">IHBB16s16s")
_TCP = struct.Struct(">HHIIBBHHH")
_HALFWORDS = struct.Struct(">10H")


def ipv4_checksum(header: bytes) -> int:
    """The RFC 791 header checksum of a 20-byte IPv4 header whose checksum field is 0."""
    total: int = sum(_HALFWORDS.unpack(header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 scope (fe80::1%lo)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # what a dual-stack socket reports for an IPv4 peer
    return address


class TcpFrames:
    """Headers of one TCP connection between a client and a server, with consistent sequence numbers.

    `headers(to_server, n)` is the Ethernet + IP + TCP header of a segment carrying the next `n` bytes in that
    direction, acknowledging everything the other side sent; `advance` moves the sequence number on once the
    segment is out. IPv4 when both ends are IPv4 (an IPv4-mapped IPv6 address counts as IPv4), else IPv6.
    """

    def __init__(
        self,
        client: tuple[str, int],
        server: tuple[str, int],
        *,
        client_isn: int = 1000,
        server_isn: int = 5000,
        window: int = 65535,
    ) -> None:
        a, b = _address(client[0]), _address(server[0])
        self.ipv6 = a.version == 6 or b.version == 6
        if self.ipv6:
            a, b = (x if x.version == 6 else ipaddress.IPv6Address(f"::ffff:{x}") for x in (a, b))
        self.client = (a.packed, client[1])
        self.server = (b.packed, server[1])
        self.seq = {True: client_isn, False: server_isn}  # keyed by "to server"
        self.ip_id = 0
        self.window = window

    def headers(
        self,
        to_server: bool,
        length: int,
        flags: int = TCP_PSH | TCP_ACK,
        seq: int | None = None,
        ack: int | None = None,
        tcp_options: bytes = b"",
    ) -> bytes:
        """The 54-byte (IPv4) or 74-byte (IPv6) header in front of `length` payload bytes (more with options,
        which must be padded to 32 bits). The acknowledgment number defaults to everything the other side
        sent, or 0 when the ACK flag is off."""
        src, dst = (self.client, self.server) if to_server else (self.server, self.client)
        own = self.seq[to_server] if seq is None else seq
        if ack is None:
            ack = self.seq[not to_server] if flags & TCP_ACK else 0
        tcp = (
            _TCP.pack(
                src[1],
                dst[1],
                own & 0xFFFFFFFF,
                ack & 0xFFFFFFFF,
                (5 + len(tcp_options) // 4) << 4,
                flags,
                self.window,
                0,
                0,
            )
            + tcp_options
        )
        macs = _MAC_SERVER + _MAC_CLIENT if to_server else _MAC_CLIENT + _MAC_SERVER
        if self.ipv6:
            ip = _IPV6.pack(6 << 28, len(tcp) + length, 6, 64, src[0], dst[0])
            return macs + _ETH_IPV6 + ip + tcp
        self.ip_id = (self.ip_id + 1) & 0xFFFF
        ip = _IPV4.pack(0x45, 0, 20 + len(tcp) + length, self.ip_id, 0x4000, 64, 6, 0, src[0], dst[0])
        ip = ip[:10] + struct.pack(">H", ipv4_checksum(ip)) + ip[12:]
        return macs + _ETH_IPV4 + ip + tcp

    def advance(self, to_server: bool, length: int) -> None:
        self.seq[to_server] += length


__all__ = [
    "MAX_SEGMENT",
    "TCP_ACK",
    "TCP_FIN",
    "TCP_PSH",
    "TCP_SYN",
    "TcpFrames",
    "block",
    "enhanced_packet",
    "interface_description",
    "ipv4_checksum",
    "options",
    "section_header",
    "text",
]
