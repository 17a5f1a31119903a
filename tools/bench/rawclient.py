"""A minimal raw-socket USB/IP disk reader for the loopback benchmarks (bench_host, bench_record): struct-built
CMD_SUBMITs and RET_SUBMITs, no vusb code, so what it measures is the server and not a host stack.

`RawClient.read` keeps `depth` READ(10) commands in flight: each command is three URBs (the CBW on bulk OUT,
one data-in URB for all of its data, the CSW on bulk IN), and the URBs of the next commands are sent before
the answers of the earlier ones are read. A USB/IP server answers an endpoint's URBs in order, and a Bulk-Only
device holds (NAKs) a CBW until the previous CSW has been read, so this is legal traffic for any server that
serializes a device's URBs. Data lands in one preallocated buffer for the whole read; hashing it is the
caller's business, after its clock stops, so that the client's own cost stays small next to the server's.
"""

from __future__ import annotations

import socket
import struct

_CMD = struct.Struct(">IIIIIIiiii8s")  # usbip_header_basic + cmd_submit
_RET = struct.Struct(">IIIIIiiiii8x")  # usbip_header_basic + ret_submit
_CBW = struct.Struct("<IIIBBB16s")
_READ_10 = struct.Struct(">BBIBHB")


class RawClient:
    """Imports `busid` from 127.0.0.1:`port`, sets configuration 1 and finds the bulk endpoints; nothing
    checked beyond URB status and the CSW."""

    def __init__(self, port: int, busid: bytes = b"1-1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(struct.pack(">HHI32s", 0x0111, 0x8003, 0, busid))
        reply = self.recv(8 + 312)
        status = struct.unpack_from(">I", reply, 4)[0]
        if status:
            raise SystemExit(f"raw import of {busid.decode()} failed with status {status}")
        busnum, devnum = struct.unpack_from(">II", reply, 8 + 288)
        self.devid = busnum << 16 | devnum
        self.seqnum = 0
        self._header = memoryview(bytearray(48))
        config = self.control(bytes.fromhex("8006000200000001"), 256)  # GET_DESCRIPTOR(CONFIGURATION)
        self.ep_in, self.ep_out = 1, 1
        at = 0
        while at + 4 <= len(config) and config[at]:
            if config[at + 1] == 5 and config[at + 3] & 3 == 2:  # a bulk endpoint
                if config[at + 2] & 0x80:
                    self.ep_in = config[at + 2] & 0x0F
                else:
                    self.ep_out = config[at + 2] & 0x0F
            at += config[at]
        self.control(bytes.fromhex("0009010000000000"), 0)  # SET_CONFIGURATION(1)

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int, into: memoryview | None = None) -> memoryview:
        view = into if into is not None else memoryview(bytearray(n))
        got = 0
        recv_into = self.sock.recv_into
        while got < n:
            k = recv_into(view[got:n])
            if not k:
                raise SystemExit("the server closed the connection")
            got += k
        return view[:n]

    def cmd(self, direction: int, ep: int, length: int, setup: bytes = bytes(8), data: bytes = b"") -> bytes:
        self.seqnum += 1
        flags = 0x200 if direction else 0
        return _CMD.pack(1, self.seqnum, self.devid, direction, ep, flags, length, 0, 0, 0, setup) + data

    def ret(self, into: memoryview | None = None, is_in: bool = True) -> tuple[int, memoryview]:
        """One RET_SUBMIT: its status and its data (into `into` if given)."""
        _, _, _, _, _, status, actual, _, _, _ = _RET.unpack(self.recv(48, self._header))
        if not (is_in and actual):
            return status, memoryview(b"")
        if into is not None and actual > len(into):
            raise SystemExit(f"the server sent {actual} bytes for a {len(into)}-byte URB")
        return status, self.recv(actual, into)

    def control(self, setup: bytes, length: int) -> bytes:
        self.sock.sendall(self.cmd(1 if setup[0] & 0x80 else 0, 0, length, setup))
        status, data = self.ret(is_in=bool(setup[0] & 0x80))
        if status:
            raise SystemExit(f"control request failed: {status}")
        return bytes(data)

    def _read10(self, tag: int, lba: int, blocks: int, block_size: int) -> bytes:
        length = blocks * block_size
        cdb = _READ_10.pack(0x28, 0, lba, 0, blocks, 0)
        cbw = _CBW.pack(0x43425355, tag, length, 0x80, 0, len(cdb), cdb)
        return self.cmd(0, self.ep_out, 31, data=cbw) + self.cmd(1, self.ep_in, length) + self.cmd(1, self.ep_in, 13)

    def read(self, into: memoryview, *, lba: int = 0, chunk: int = 64 * 1024, depth: int = 8,
             block_size: int = 512) -> None:
        """Fill `into` from block `lba` on with READ(10) of `chunk` bytes, `depth` commands in flight."""
        size = len(into)
        if size % chunk or chunk % block_size or depth < 1:
            raise ValueError("the read must be whole chunks of whole blocks, depth at least 1")
        blocks = chunk // block_size
        count = size // chunk
        sock = self.sock
        first = min(depth, count)
        sock.sendall(b"".join(self._read10(i + 1, lba + i * blocks, blocks, block_size) for i in range(first)))
        sent = first
        for i in range(count):
            status, _ = self.ret(is_in=False)
            data_status, data = self.ret(into[i * chunk:(i + 1) * chunk])
            csw_status, csw = self.ret()
            if status or data_status or csw_status or len(data) != chunk or len(csw) != 13 \
                    or bytes(csw[:4]) != b"USBS" \
                    or int.from_bytes(csw[4:8], "little") != i + 1 or csw[12]:
                raise SystemExit(f"raw READ(10) at block {lba + i * blocks} failed (URB status {status}/"
                                 f"{data_status}/{csw_status}, {len(data)} bytes, CSW {bytes(csw).hex()})")
            if sent < count:
                sock.sendall(self._read10(sent + 1, lba + sent * blocks, blocks, block_size))
                sent += 1
