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
    The common case (no TCP options) is one `struct.pack` over precomputed constants: the recorder calls it
    for every segment of a live session.
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
        self._prefix: dict[bool, bytes] = {}
        self._route: dict[bool, bytes] = {}  # addresses then ports, as the IP and TCP headers carry them
        for to_server in (True, False):
            src, dst = (self.client, self.server) if to_server else (self.server, self.client)
            macs = _MAC_SERVER + _MAC_CLIENT if to_server else _MAC_CLIENT + _MAC_SERVER
            self._prefix[to_server] = macs + (
                _ETH_IPV6 + b"\x60\0\0\0" if self.ipv6 else _ETH_IPV4 + b"\x45\0"
            )
            self._route[to_server] = src[0] + dst[0] + struct.pack(">HH", src[1], dst[1])
        # every IPv4 header halfword but total length, identification and checksum (the same both ways)
        self._sum = (
            0 if self.ipv6 else 0x4500 + 0x4000 + 0x4006 + sum(struct.unpack(">4H", a.packed + b.packed))
        )

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
        own = self.seq[to_server] if seq is None else seq
        if ack is None:
            ack = self.seq[not to_server] if flags & TCP_ACK else 0
        tcp_length = 20 + len(tcp_options)
        if self.ipv6:
            return (
                _V6.pack(
                    self._prefix[to_server],
                    tcp_length + length,
                    b"\x06\x40",
                    self._route[to_server],
                    own & 0xFFFFFFFF,
                    ack & 0xFFFFFFFF,
                    tcp_length << 2,
                    flags,
                    self.window,
                )
                + tcp_options
            )
        self.ip_id = ip_id = (self.ip_id + 1) & 0xFFFF
        total = 20 + tcp_length + length
        folded = self._sum + total + ip_id
        folded = (folded & 0xFFFF) + (folded >> 16)
        folded = (folded & 0xFFFF) + (folded >> 16)
        return (
            _V4.pack(
                self._prefix[to_server],
                total,
                ip_id,
                b"\x40\0\x40\x06",
                ~folded & 0xFFFF,
                self._route[to_server],
                own & 0xFFFFFFFF,
                ack & 0xFFFFFFFF,
                tcp_length << 2,
                flags,
                self.window,
            )
            + tcp_options
        )

    def ipv4_layout(self, to_server: bool) -> tuple[struct.Struct, bytes, bytes, int]:
        """What `payload_headers` packs from, for a caller that frames segments in its own loop (the recorder's
        hot path): the header's struct (fields: the first bytes below, total length, identification,
        b"\\x40\\0\\x40\\x06", checksum, the addresses and ports below, seq, ack, 0x50, flags, window), the Ethernet
        + IPv4 start and addresses + ports of `to_server`'s segments, and the checksum's constant part (add the
        total length and the identification, fold twice, invert). IPv4 connections only."""
        assert not self.ipv6
        return _V4, self._prefix[to_server], self._route[to_server], self._sum

    def advance(self, to_server: bool, length: int) -> None:
        self.seq[to_server] += length

    def payload_headers(self, to_server: bool, lengths: list[int]) -> list[bytes]:
        """The headers (PSH|ACK, no options) of consecutive segments carrying `lengths` bytes, sequence number
        advanced past them: what `headers` + `advance` give one by one, in one call (the recorder's hot path)."""
        if self.ipv6:
            out = []
            for length in lengths:
                out.append(self.headers(to_server, length))
                self.seq[to_server] += length
            return out
        pack = _V4.pack
        prefix, route, base, window = self._prefix[to_server], self._route[to_server], self._sum, self.window
        own = self.seq[to_server]
        ack = self.seq[not to_server] & 0xFFFFFFFF
        ip_id = self.ip_id
        out = []
        for length in lengths:
            ip_id = (ip_id + 1) & 0xFFFF
            total = 40 + length
            folded = base + total + ip_id
            folded = (folded & 0xFFFF) + (folded >> 16)
            folded = (folded & 0xFFFF) + (folded >> 16)
            out.append(
                pack(
                    prefix,
                    total,
                    ip_id,
                    b"\x40\0\x40\x06",
                    ~folded & 0xFFFF,
                    route,
                    own & 0xFFFFFFFF,
                    ack,
                    0x50,
                    TCP_PSH | TCP_ACK,
                    window,
                )
            )
            own += length
        self.ip_id = ip_id
        self.seq[to_server] = own
        return out


# Ethernet + IPv4 version/IHL and TOS (16 bytes), total length, identification, DF + TTL 64 + TCP, checksum; or
# Ethernet + IPv6 version/class/flow (18 bytes), payload length, next header TCP + hop limit 64; then addresses
# and ports, seq, ack, data offset, flags, window, checksum 0, urgent pointer 0.
_V4 = struct.Struct(">16sHH4sH12sIIBBH4x")
_V6 = struct.Struct(">18sH2s36sIIBBH4x")


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
