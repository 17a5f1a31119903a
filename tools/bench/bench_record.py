"""What recording costs the server: 64 MiB of sequential READ(10) with `--record` on ÷ off (a script, not a test).

vusb's server runs in a child process (`vusb serve --disk IMAGE --read-only`, plus `--record FILE` for the
recorded runs) exporting an image of random data; this process reads all of it with a raw-socket client that
keeps several READ(10) commands in flight (CBW + data + CSW URBs of `--depth` commands queued ahead, each
command's data in one 64 KiB URB), so the server, not the client, sets the pace. Runs alternate off/on, the
fastest of `--repeat` counts for each; every run checks the bytes (sha256) and every recording is checked to
hold the whole transfer (`captures.transactions.analyze`: every READ(10) paired, its data bytes counted).

It prints MiB/s off and on, the ratio on ÷ off (target >= 0.9), and the recording's size and frames.

    .venv/bin/python tools/bench/bench_record.py [--size-mib 64] [--repeat 3] [--depth 4]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from captures.transactions import analyze  # noqa: E402

MIB = 1 << 20
CHUNK = 64 * 1024
BLOCKS = CHUNK // 512

_CMD = struct.Struct(">IIIIIIiiii8s")  # usbip_header_basic + cmd_submit
_RET = struct.Struct(">IIIIIiiiii8x")  # usbip_header_basic + ret_submit
_CBW = struct.Struct("<IIIBBB16s")


class PipelinedClient:
    """Imports 1-1 and reads the disk with `depth` READ(10) commands in flight; struct only, no core."""

    def __init__(self, port: int, depth: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MIB)
        self.depth = depth
        self.sock.sendall(struct.pack(">HHI32s", 0x0111, 0x8003, 0, b"1-1"))
        reply = self._recv(8 + 312)
        if struct.unpack_from(">I", reply, 4)[0]:
            raise SystemExit("import of 1-1 refused")
        busnum, devnum = struct.unpack_from(">II", reply, 8 + 288)
        self.devid = busnum << 16 | devnum
        self.seqnum = 0
        self.buffer = memoryview(bytearray(CHUNK))
        self.sock.sendall(self._cmd(0, 0, 0, bytes.fromhex("0009010000000000")))  # SET_CONFIGURATION(1)
        self._ret(False)

    def _recv(self, n: int, into: memoryview | None = None) -> memoryview:
        view = into if into is not None else memoryview(bytearray(n))
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:n])
            if not k:
                raise SystemExit("the server closed the connection")
            got += k
        return view[:n]

    def _cmd(self, direction: int, ep: int, length: int, setup: bytes = bytes(8), data: bytes = b"") -> bytes:
        self.seqnum += 1
        flags = 0x200 if direction else 0
        return _CMD.pack(1, self.seqnum, self.devid, direction, ep, flags, length, 0, 0, 0, setup) + data

    def _ret(self, is_in: bool, into: memoryview | None = None) -> memoryview:
        _, _, _, _, _, status, actual, _, _, _ = _RET.unpack(self._recv(48))
        if status:
            raise SystemExit(f"URB failed with status {status}")
        return self._recv(actual, into) if is_in and actual else memoryview(b"")

    def _command(self, tag: int, lba: int) -> bytes:
        cdb = struct.pack(">BBIBHB", 0x28, 0, lba, 0, BLOCKS, 0)
        cbw = _CBW.pack(0x43425355, tag, CHUNK, 0x80, 0, len(cdb), cdb)
        return self._cmd(0, 1, 31, data=cbw) + self._cmd(1, 1, CHUNK) + self._cmd(1, 1, 13)

    def read(self, size: int) -> tuple[float, str]:
        digest = hashlib.sha256()
        lbas = list(range(0, size // 512, BLOCKS))
        start = time.perf_counter()
        sent = 0
        while sent < min(self.depth, len(lbas)):
            self.sock.sendall(self._command(sent + 1, lbas[sent]))
            sent += 1
        for _ in lbas:
            self._ret(False)
            digest.update(self._ret(True, self.buffer))
            csw = self._ret(True)
            if bytes(csw[:4]) != b"USBS" or csw[12]:
                raise SystemExit("READ(10) failed (CSW)")
            if sent < len(lbas):
                self.sock.sendall(self._command(sent + 1, lbas[sent]))
                sent += 1
        elapsed = time.perf_counter() - start
        self.sock.close()
        return elapsed, digest.hexdigest()


def serve(image: Path, record: Path | None) -> tuple[subprocess.Popen[str], int]:
    args = [sys.executable, "-m", "emulator.cli", "serve", "--port", "0", "--disk", str(image), "--read-only"]
    if record is not None:
        args += ["--record", str(record)]
    child = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
    assert child.stderr is not None
    for line in child.stderr:
        found = re.search(r"listening on [\d.]+:(\d+)", line)
        if found:
            return child, int(found.group(1))
    raise SystemExit(f"vusb serve did not start (exit {child.wait()})")


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of process `pid` so far, to the nanosecond (/proc/PID/task/*/schedstat: the
    scheduler's run time; /proc/PID/stat counts in 10 ms ticks, too coarse for a 50 ms run)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def stop(child: subprocess.Popen[str]) -> None:
    child.terminate()
    try:
        child.wait(30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=64, help="bytes to read, in MiB (default 64)")
    parser.add_argument("--repeat", type=int, default=3, help="runs each way; the fastest counts")
    parser.add_argument("--depth", type=int, default=4, help="READ(10) commands in flight (default 4)")
    args = parser.parse_args()
    size = args.size_mib * MIB

    with tempfile.TemporaryDirectory(prefix="vusb-bench-record-") as tmp:
        image = Path(tmp) / "disk.img"
        with image.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MIB))
        expected = hashlib.sha256(image.read_bytes()).hexdigest()
        best = {False: float("inf"), True: float("inf")}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        recording = Path(tmp) / "session.pcapng"
        print(f"vusb serve (child process), {args.size_mib} MiB sequential READ(10) of {CHUNK // 1024} KiB, "
              f"{args.depth} commands in flight, best of {args.repeat}\n")
        for run in range(args.repeat):
            for record in (False, True):
                recording.unlink(missing_ok=True)
                child, port = serve(image, recording if record else None)
                try:
                    client = PipelinedClient(port, args.depth)
                    before = cpu_seconds(child.pid)
                    seconds, digest = client.read(size)
                    time.sleep(0.05)  # let the server finish its last sends
                    cpu[record].append(cpu_seconds(child.pid) - before)
                finally:
                    stop(child)
                if digest != expected:
                    raise SystemExit(f"run {run + 1} ({'on' if record else 'off'}): wrong bytes read")
                best[record] = min(best[record], seconds)
                print(f"  run {run + 1} recording {'on ' if record else 'off'}: {size / MIB / seconds:7.1f} MiB/s, "
                      f"server CPU {cpu[record][-1] * 1000:4.0f} ms")
                if record:
                    analysis = analyze(recording)
                    reads = [c for c in analysis.scsi_commands if c.name == "READ_10"]
                    data = sum(c.data_bytes or 0 for c in reads)
                    if len(reads) != size // CHUNK or data != size:
                        raise SystemExit(f"the recording holds {len(reads)} READ(10) and {data} bytes, "
                                         f"not {size // CHUNK} and {size}")
                    frames, file_size = analysis.frames, recording.stat().st_size
        off, on = size / MIB / best[False], size / MIB / best[True]
        print(f"\nrecording off: {off:8.1f} MiB/s")
        print(f"recording on:  {on:8.1f} MiB/s   ({frames} frames, {file_size / MIB:.1f} MiB of pcapng; "
              f"every READ(10) and its {CHUNK // 1024} KiB found by analyze())")
        print(f"ratio on / off = {on / off:.3f}   (target >= 0.9)")
        low = {k: min(v) * 1000 for k, v in cpu.items()}
        print(f"server CPU for the {args.size_mib} MiB (all threads, least of the runs): off {low[False]:.0f} ms, "
              f"on {low[True]:.0f} ms (the recorder's share: {low[True] - low[False]:.0f} ms; the machine has "
              f"{os.cpu_count()} CPUs for server and client)")


if __name__ == "__main__":
    main()
