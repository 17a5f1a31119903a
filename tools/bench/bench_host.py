"""Benchmark of USB/IP disk reads on loopback: vusb's server and userspace host against the PyPI `usbip`
package (0.7.0, the `bench` extra) and a minimal raw-socket client (a script, not a test).

Two servers run in child processes (each on its own core, if there are two), exporting the same 64 MiB
image of random data as a high-speed thumb drive: vusb's `UsbipServer` with `mass_storage_device`, and the
PyPI package's `USBIP` transport with its `MSC` class (a file store doing one `pread` per command). This
process reads the whole disk sequentially with READ(10) of 64 KiB through:

  (a) vusb's userspace host (`emulator.host` + `emulator.msc_host`) ← vusb's server:
      a1    one URB in flight: CBW, wait; data (one 64 KiB URB), wait; CSW, wait — three round trips;
      a1p   one command, its phases pipelined: CBW + one 64 KiB data URB + CSW submitted together;
      a8p   the same with the data phase split into 8 URBs of 8 KiB;
      a8    `--depth` (8) READ(10) commands in flight (`MassStorage(commands_in_flight=8)`, safe with a
            server that serializes a device's URBs, as vusb's does): the issue's "8+ commands in flight";
      a8b   the same through the blocking facade (`SyncMassStorage`): the same host code run by the
            blocking runtime (`emulator.blocking`) in this thread, without an event loop.
  (b) the PyPI package's own host library (`usbip.open` + `MSCDriver.read_blocks`) ← its own server: one
      blocking URB at a time (its client neither pipelines nor sets TCP_NODELAY); (b-nd) the same with
      TCP_NODELAY set on its socket, to compare the host stacks rather than Nagle's algorithm.
  (c) a minimal raw-socket client (tools/bench/rawclient.py: struct only, no vusb code) keeping `--depth`
      READ(10) commands in flight — each CBW + 64 KiB data + CSW URB, the next commands' URBs queued before
      the earlier answers are read — reading vusb's server (c) and the PyPI server (c-py). This isolates the
      servers. (c1), (c1-py): the same client with one command in flight.

Every reader fills one buffer for the whole image and hashes it after its clock stops (as the VM bench
does), so no reader's timing includes sha256.

For each line it prints MiB/s (the fastest of --repeat runs, taken round-robin over the readers so that
load coming and going on a shared machine falls on all of them) and the server's CPU time per command
(from /proc/PID/stat, so threads count too; 10 ms ticks), checks every reader got the image's bytes, and prints the
ratios the targets are stated in. Then the control-transfer round trip (GET_DESCRIPTOR(DEVICE), 18 bytes)
p50/p99 for each client.

    .venv/bin/python tools/bench/bench_host.py [--size-mib 64] [--controls 2000] [--repeat 3] [--depth 8]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from emulator.host import import_device  # noqa: E402
from emulator.msc_host import MassStorage, SyncMassStorage  # noqa: E402
from emulator.sync_host import SyncRemoteDevice  # noqa: E402
from tools.bench.common import PYPI_SERVER, cpu_seconds  # noqa: E402
from tools.bench.rawclient import RawClient  # noqa: E402

MIB = 1 << 20
CHUNK = 64 * 1024

_VUSB_SERVER = textwrap.dedent("""
    import asyncio, sys
    from emulator.server import UsbipServer
    from emulator.devices.mass_storage import mass_storage_device

    async def main():
        server = UsbipServer([mass_storage_device(sys.argv[1], read_only=True)], host="127.0.0.1", port=0)
        await server.start()
        print(server.port, flush=True)
        await server.serve_forever()

    asyncio.run(main())
""")

class Server:
    """A server in a child process, and the CPU time it has used (user + system, all threads)."""

    def __init__(self, name: str, script: str, image: Path) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, "-c", script, str(image)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the {name} server did not start")
        self.port = int(line)

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


# -- (a) the vusb userspace host ------------------------------------------------------------------------------


async def host_read(port: int, size: int, *, pipeline: bool, urbs: int, in_flight: int = 1) -> tuple[float, str]:
    async with await import_device("127.0.0.1", "1-1", port) as device:
        msc = await MassStorage(device, pipeline=pipeline, urbs_per_command=urbs, max_transfer=CHUNK,
                                commands_in_flight=in_flight).open()
        buffer = bytearray(size)
        start = time.perf_counter()
        await msc.readinto_blocks(0, memoryview(buffer))  # commands of CHUNK bytes
        elapsed = time.perf_counter() - start
        return elapsed, hashlib.sha256(buffer).hexdigest()


def blocking_read(port: int, size: int, in_flight: int) -> tuple[float, str]:
    """(a8b): the same pipelined READ(10)s through the blocking facade (`SyncMassStorage`: the host's code on
    the blocking runtime, in this thread, no event loop)."""
    with SyncRemoteDevice.open("127.0.0.1", "1-1", port) as remote:
        disk = SyncMassStorage(remote, max_transfer=CHUNK, commands_in_flight=in_flight)
        buffer = bytearray(size)
        start = time.perf_counter()
        disk.readinto_blocks(0, memoryview(buffer))
        elapsed = time.perf_counter() - start
    return elapsed, hashlib.sha256(buffer).hexdigest()


def round_trips(count: int, request: Callable[[], object]) -> list[float]:
    """Seconds each of `count` calls of `request` took (one control round trip each)."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        request()
        times.append(time.perf_counter() - start)
    return times


def blocking_controls(port: int, count: int) -> list[float]:
    with SyncRemoteDevice.open("127.0.0.1", "1-1", port) as remote:
        return round_trips(count, lambda: remote.get_descriptor(1, 0, 18))


async def host_controls(port: int, count: int) -> list[float]:
    async with await import_device("127.0.0.1", "1-1", port) as device:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            await device.get_descriptor(1, 0, 18)
            times.append(time.perf_counter() - start)
        return times


# -- (b) the PyPI package's host library ----------------------------------------------------------------------


def pypi_transport(port: int, *, nodelay: bool = False) -> object:
    """The PyPI package's TCP transport to 127.0.0.1:`port`; `nodelay` sets TCP_NODELAY on its socket, which
    the package's client does not do (so every header sent apart from its payload waits out Nagle and
    the server's delayed ACK)."""
    import usbip

    class NoDelay(usbip.USBIP):  # type: ignore[misc]
        def connect(self) -> socket.socket:
            sock = super().connect()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock  # type: ignore[no-any-return]

    return (NoDelay if nodelay else usbip.USBIP)("127.0.0.1", port)


def pypi_read(port: int, size: int, *, nodelay: bool = False) -> tuple[float, str]:
    import usbip
    from usbip.classes.host.msc import MSCDriver

    driver = MSCDriver(usbip.open(busid="1-1", transport=pypi_transport(port, nodelay=nodelay)))
    try:
        buffer = bytearray(size)
        per = CHUNK // 512
        start = time.perf_counter()
        for lba in range(0, size // 512, per):
            buffer[lba * 512:lba * 512 + CHUNK] = driver.read_blocks(lba, per, 512)
        elapsed = time.perf_counter() - start
        return elapsed, hashlib.sha256(buffer).hexdigest()
    finally:
        driver.close()


def pypi_controls(port: int, count: int) -> list[float]:
    import usbip

    handle = usbip.open(busid="1-1", transport=usbip.USBIP("127.0.0.1", port))
    try:
        return round_trips(count, lambda: handle.control(0x80, 0x06, 0x0100, 0, 18))
    finally:
        handle.close()


# -- (c) the raw-socket client (tools/bench/rawclient.py) ---------------------------------------------------


def raw_read(port: int, size: int, depth: int) -> tuple[float, str]:
    client = RawClient(port)
    buffer = bytearray(size)
    start = time.perf_counter()
    client.read(memoryview(buffer), chunk=CHUNK, depth=depth)
    elapsed = time.perf_counter() - start
    client.close()
    return elapsed, hashlib.sha256(buffer).hexdigest()


def raw_controls(port: int, count: int) -> list[float]:
    client = RawClient(port)
    setup = bytes.fromhex("8006000100001200")
    times = round_trips(count, lambda: client.control(setup, 18))
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
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each read; the fastest counts (the machine is shared and noisy)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated reader keys to run (e.g. c,c-py); the ratios and control round trips that "
        "need readers left out are skipped",
    )
    parser.add_argument("--depth", type=int, default=8, help="READ(10) commands in flight for (a8) and (c)")
    args = parser.parse_args()
    only = {key for key in args.only.split(",") if key}
    size = args.size_mib * MIB
    commands = size // CHUNK

    with tempfile.TemporaryDirectory(prefix="vusb-bench-") as tmp:
        image = Path(tmp) / "disk.img"
        with image.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MIB))
        expected = hashlib.sha256(image.read_bytes()).hexdigest()
        servers: list[Server] = []
        try:
            vusb = Server("vusb", _VUSB_SERVER, image)
            servers.append(vusb)
            pypi = Server("PyPI usbip", PYPI_SERVER, image)
            servers.append(pypi)
            print(
                f"servers (child processes): vusb on 127.0.0.1:{vusb.port}, PyPI usbip 0.7.0 on "
                f"127.0.0.1:{pypi.port}; reading {args.size_mib} MiB sequentially, READ(10) of "
                f"{CHUNK // 1024} KiB per command\n"
            )
            print(f"{'':6s}{'reader ← server':58s}{'MiB/s':>8s}   server CPU/command")
            rates: dict[str, float] = {}
            readers: list[tuple[str, str, Server, Callable[[], tuple[float, str]]]] = [
                (
                    key,
                    what,
                    vusb,
                    lambda p=pipeline, u=urbs, n=n: asyncio.run(
                        host_read(vusb.port, size, pipeline=p, urbs=u, in_flight=n)
                    ),
                )
                for key, pipeline, urbs, n, what in (
                    ("a1", False, 1, 1, "vusb host, 1 URB in flight ← vusb server"),
                    ("a1p", True, 1, 1, "vusb host, 1 command, phases pipelined ← vusb server"),
                    ("a8p", True, 8, 1, "vusb host, 1 command, data in 8 URBs ← vusb server"),
                    ("a8", True, 1, args.depth, f"vusb host, {args.depth} commands in flight ← vusb server"),
                )
            ]
            readers += [
                (
                    "a8b",
                    f"vusb host, blocking facade, {args.depth} in flight ← vusb server",
                    vusb,
                    lambda: blocking_read(vusb.port, size, args.depth),
                ),
                (
                    "b",
                    "PyPI usbip host library ← PyPI usbip server (one run)",
                    pypi,
                    lambda: pypi_read(pypi.port, size),
                ),
                (
                    "b-nd",
                    "PyPI usbip host, TCP_NODELAY set ← PyPI usbip server",
                    pypi,
                    lambda: pypi_read(pypi.port, size, nodelay=True),
                ),
                (
                    "c",
                    f"raw-socket client, {args.depth} commands in flight ← vusb server",
                    vusb,
                    lambda: raw_read(vusb.port, size, args.depth),
                ),
                (
                    "c-py",
                    f"raw-socket client, {args.depth} commands in flight ← PyPI server",
                    pypi,
                    lambda: raw_read(pypi.port, size, args.depth),
                ),
                ("c1", "raw-socket client, 1 command in flight ← vusb server", vusb, lambda: raw_read(vusb.port, size, 1)),
                (
                    "c1-py",
                    "raw-socket client, 1 command in flight ← PyPI server",
                    pypi,
                    lambda: raw_read(pypi.port, size, 1),
                ),
            ]
            if only:
                unknown = only - {key for key, *_ in readers}
                if unknown:
                    raise SystemExit(f"--only: no reader {', '.join(sorted(unknown))}")
                readers = [reader for reader in readers if reader[0] in only]
            # Round-robin: each repeat runs every reader once, so load that comes and goes on the shared
            # machine falls on all of them; the fastest run of each counts.
            seconds = {key: float("inf") for key, *_ in readers}
            cpu = dict.fromkeys(seconds, 0.0)
            runs = dict.fromkeys(seconds, 0)
            for repeat in range(args.repeat):
                for key, _what, server, read in readers:
                    if key == "b" and repeat:  # ~45 s a run (Nagle): once says enough
                        continue
                    before = server.cpu()
                    took, digest = read()
                    cpu[key] += server.cpu() - before
                    runs[key] += 1
                    assert digest == expected, f"({key}): read back the wrong bytes"
                    seconds[key] = min(seconds[key], took)
            for key, what, _server, _read in readers:
                rates[key] = size / MIB / seconds[key]
                per_command = cpu[key] / (runs[key] * commands) * 1e6
                print(f"({key + ')':5s} {what:58s}{rates[key]:8.1f}   {per_command:6.0f} µs")

            print()
            if "c" in rates and "c-py" in rates:
                print(
                    f"servers, same raw client:    vusb ÷ PyPI usbip     (c) / (c-py) = "
                    f"{rates['c'] / rates['c-py']:.2f}   (target ≥ 1.2)"
                )
            if "c1" in rates and "c1-py" in rates:
                print(f"  the same, 1 in flight:                           (c1) / (c1-py) = "
                      f"{rates['c1'] / rates['c1-py']:.2f}")
            if only:
                return
            for key in ("a1", "a1p", "a8p", "a8", "a8b"):
                print(
                    f"vusb host vs raw client:     ({key}) / (c){'':{12 - len(key)}s}= {rates[key] / rates['c']:.2f}"
                    f"{'   (target ≥ 0.8)' if key in ('a8', 'a8b') else ''}"
                )
            best_1 = max(rates["a1"], rates["a1p"], rates["a8p"])
            print(f"host stacks, each its own:   (a8) / (b)            = {rates['a8'] / rates['b']:.2f}   (target ≥ 2)")
            print(f"  1 command in flight:       best (a1*) / (b)      = {best_1 / rates['b']:.2f}")
            print(f"  the same, PyPI with NODELAY: (a8) / (b-nd)       = {rates['a8'] / rates['b-nd']:.2f}")
            print()
            print(
                f"control round trip, vusb host ← vusb server:        "
                f"{percentiles(asyncio.run(host_controls(vusb.port, args.controls)))}"
            )
            print(
                f"control round trip, vusb blocking facade ← vusb:    "
                f"{percentiles(blocking_controls(vusb.port, args.controls))}"
            )
            print(
                f"control round trip, PyPI host ← PyPI server:        "
                f"{percentiles(pypi_controls(pypi.port, args.controls))}"
            )
            print(
                f"control round trip, raw client ← vusb server:       "
                f"{percentiles(raw_controls(vusb.port, args.controls))}"
            )
            print(
                f"control round trip, raw client ← PyPI usbip server: "
                f"{percentiles(raw_controls(pypi.port, args.controls))}"
            )
        finally:
            for server in servers:
                server.stop()


if __name__ == "__main__":
    main()
