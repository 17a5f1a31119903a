"""Benchmark of the userspace host reading a disk over USB/IP on loopback (a script, not a test).

vusb's server runs in a child process (its own core) exporting a 64 MiB thumb drive filled with random
data; this process reads all of it sequentially with READ(10) of 64 KiB, through:

  (a) vusb's userspace host (`emulator.host` + `emulator.msc_host`), in three shapes:
      a1    one URB in flight: CBW, wait; data (one 64 KiB URB), wait; CSW, wait — three round trips;
      a1p   the command's phases pipelined: CBW + one 64 KiB data URB + CSW submitted together, one
            round trip (3 URBs in flight);
      a8p   pipelined with the data phase split into 8 URBs of 8 KiB (10 URBs in flight).
      Bulk-Only Transport allows one command at a time per device (the next CBW only after the CSW), and
      LUNs share that one pipe, so "N in flight" can only mean the URBs of one command; no shape overlaps
      two commands.
  (c) a minimal raw-socket client: struct-built CMD_SUBMITs for CBW + data + CSW of each command sent in
      one sendall, RET_SUBMITs parsed with struct into a preallocated buffer — no core, no asyncio.

It prints MiB/s for each (the fastest of --repeat runs), the ratio of each (a) to (c), checks that every reader got the same bytes, and
the control-transfer round trip (GET_DESCRIPTOR(DEVICE), 18 bytes) p50/p99 for the host and the raw
client.

    .venv/bin/python tools/bench/bench_host.py [--size-mib 64] [--controls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from emulator.host import import_device  # noqa: E402
from emulator.msc_host import MassStorage  # noqa: E402

MIB = 1 << 20
CHUNK = 64 * 1024

_SERVER = textwrap.dedent("""
    import asyncio, sys
    from emulator.server import UsbipServer
    from emulator.devices.mass_storage import mass_storage_device

    async def main():
        server = UsbipServer([mass_storage_device(sys.argv[1])], host="127.0.0.1", port=0)
        await server.start()
        print(server.port, flush=True)
        await server.serve_forever()

    asyncio.run(main())
""")


# -- (a) the vusb userspace host ------------------------------------------------------------------------------


async def host_read(port: int, size: int, *, pipeline: bool, urbs: int) -> tuple[float, str]:
    async with await import_device("127.0.0.1", "1-1", port) as device:
        msc = await MassStorage(device, pipeline=pipeline, urbs_per_command=urbs, max_transfer=CHUNK).open()
        digest = hashlib.sha256()
        per = CHUNK // 512
        start = time.perf_counter()
        for lba in range(0, size // 512, per):
            digest.update(await msc.read_blocks(lba, per))
        return time.perf_counter() - start, digest.hexdigest()


async def host_controls(port: int, count: int) -> list[float]:
    async with await import_device("127.0.0.1", "1-1", port) as device:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            await device.get_descriptor(1, 0, 18)
            times.append(time.perf_counter() - start)
        return times


# -- (c) the raw-socket client ---------------------------------------------------------------------------------

_CMD = struct.Struct(">IIIIIIiiii8s")  # usbip_header_basic + cmd_submit
_RET = struct.Struct(">IIIIIiiiii8x")  # usbip_header_basic + ret_submit
_CBW = struct.Struct("<IIIBBB16s")


class RawClient:
    """Just enough USB/IP to import a disk and read it: no state machine, no checks beyond the CSW."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(struct.pack(">HHI32s", 0x0111, 0x8003, 0, b"1-1"))
        reply = self.recv(8 + 312)
        status = struct.unpack_from(">I", reply, 4)[0]
        if status:
            raise SystemExit(f"raw import failed with status {status}")
        busnum, devnum = struct.unpack_from(">II", reply, 8 + 288)
        self.devid = busnum << 16 | devnum
        self.seqnum = 0
        self.buffer = bytearray(CHUNK + 64)
        self.control(bytes.fromhex("0009010000000000"), 0)  # SET_CONFIGURATION(1)

    def recv(self, n: int, into: memoryview | None = None) -> memoryview:
        view = into if into is not None else memoryview(bytearray(n))
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:n])
            if not k:
                raise SystemExit("the server closed the connection")
            got += k
        return view[:n]

    def cmd(self, direction: int, ep: int, length: int, setup: bytes = bytes(8), data: bytes = b"") -> bytes:
        self.seqnum += 1
        flags = 0x200 if direction else 0
        return _CMD.pack(1, self.seqnum, self.devid, direction, ep, flags, length, 0, 0, 0, setup) + data

    def ret(self, into: memoryview | None = None, is_in: bool = True) -> tuple[int, memoryview]:
        header = self.recv(48)
        _, _, _, _, _, status, actual, _, _, _ = _RET.unpack(header)
        data = self.recv(actual, into) if is_in and actual else memoryview(b"")
        return status, data

    def control(self, setup: bytes, length: int) -> bytes:
        self.sock.sendall(self.cmd(1 if setup[0] & 0x80 else 0, 0, length, setup))
        status, data = self.ret(is_in=bool(setup[0] & 0x80))
        if status:
            raise SystemExit(f"control request failed: {status}")
        return bytes(data)

    def read10(self, tag: int, lba: int, blocks: int, sink: hashlib._Hash) -> None:
        length = blocks * 512
        cdb = struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)
        cbw = _CBW.pack(0x43425355, tag, length, 0x80, 0, len(cdb), cdb)
        self.sock.sendall(self.cmd(0, 1, 31, data=cbw) + self.cmd(1, 1, length) + self.cmd(1, 1, 13))
        status, _ = self.ret(is_in=False)
        data_status, data = self.ret(memoryview(self.buffer))
        sink.update(data)
        csw_status, csw = self.ret()
        if status or data_status or csw_status or bytes(csw[:4]) != b"USBS" or csw[12]:
            raise SystemExit(f"raw READ(10) at {lba} failed")


def raw_read(port: int, size: int) -> tuple[float, str]:
    client = RawClient(port)
    digest = hashlib.sha256()
    per = CHUNK // 512
    start = time.perf_counter()
    for tag, lba in enumerate(range(0, size // 512, per), start=1):
        client.read10(tag, lba, per, digest)
    elapsed = time.perf_counter() - start
    client.sock.close()
    return elapsed, digest.hexdigest()


def raw_controls(port: int, count: int) -> list[float]:
    client = RawClient(port)
    setup = bytes.fromhex("8006000100001200")
    times = []
    for _ in range(count):
        start = time.perf_counter()
        client.control(setup, 18)
        times.append(time.perf_counter() - start)
    client.sock.close()
    return times


# -- running it all ------------------------------------------------------------------------------------------


def percentiles(times: list[float]) -> str:
    ordered = sorted(times)
    p50 = statistics.median(ordered) * 1e6
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6
    return f"p50 {p50:7.1f} µs   p99 {p99:7.1f} µs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=64, help="bytes to read, in MiB (default 64)")
    parser.add_argument("--controls", type=int, default=2000, help="control round trips to time")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each read; the fastest counts (the machine is shared and noisy)")
    args = parser.parse_args()
    size = args.size_mib * MIB

    with tempfile.TemporaryDirectory(prefix="vusb-bench-") as tmp:
        image = Path(tmp) / "disk.img"
        with image.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MIB))
        expected = hashlib.sha256(image.read_bytes()).hexdigest()
        server = subprocess.Popen([sys.executable, "-c", _SERVER, str(image)], stdout=subprocess.PIPE, text=True,
                                  cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            print(f"vusb server (child process) on 127.0.0.1:{port}; reading {args.size_mib} MiB sequentially, "
                  f"READ(10) of {CHUNK // 1024} KiB per command\n")
            rows: list[tuple[str, float]] = []
            for name, pipeline, urbs, what in (
                    ("a1 ", False, 1, "vusb host, 1 URB in flight (CBW, data, CSW in turn)"),
                    ("a1p", True, 1, "vusb host, phases pipelined (3 URBs in flight)"),
                    ("a8p", True, 8, "vusb host, pipelined, data in 8 URBs (10 in flight)")):
                seconds = float("inf")
                for _ in range(args.repeat):
                    took, digest = asyncio.run(host_read(port, size, pipeline=pipeline, urbs=urbs))
                    assert digest == expected, f"{name}: read back the wrong bytes"
                    seconds = min(seconds, took)
                rows.append((name, size / MIB / seconds))
                print(f"({name}) {what:55s} {size / MIB / seconds:8.1f} MiB/s")
            seconds = float("inf")
            for _ in range(args.repeat):
                took, digest = raw_read(port, size)
                assert digest == expected, "raw client: read back the wrong bytes"
                seconds = min(seconds, took)
            raw = size / MIB / seconds
            print(f"(c)   {'raw-socket client, phases pipelined (struct, no core)':55s} {raw:8.1f} MiB/s\n")
            for name, rate in rows:
                print(f"ratio ({name.strip()}) / (c) = {rate / raw:.2f}")
            print()
            print(f"control round trip, vusb host:        {percentiles(asyncio.run(host_controls(port, args.controls)))}")
            print(f"control round trip, raw-socket client: {percentiles(raw_controls(port, args.controls))}")
        finally:
            server.kill()
            server.wait(10)


if __name__ == "__main__":
    main()
