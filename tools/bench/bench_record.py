"""What recording costs the server: 64 MiB of sequential READ(10) with `--record` on ÷ off (a script, not a test).

vusb's server runs in a child process (`vusb serve --disk IMAGE --read-only`, plus `--record FILE` for the
recorded runs) exporting an image of random data; this process reads all of it with a raw-socket client that
keeps several READ(10) commands in flight (CBW + data + CSW URBs of `--depth` commands queued ahead, each
command's data in one 64 KiB URB; tools/bench/rawclient.py), so the server, not the client, sets the
pace; the bytes land in one buffer and are hashed after the clock stops. Runs alternate off/on, the
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from captures.transactions import analyze  # noqa: E402
from tools.bench.rawclient import RawClient  # noqa: E402

MIB = 1 << 20
CHUNK = 64 * 1024

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
                    client = RawClient(port)
                    buffer = bytearray(size)
                    before = cpu_seconds(child.pid)
                    start = time.perf_counter()
                    client.read(memoryview(buffer), chunk=CHUNK, depth=args.depth)
                    seconds = time.perf_counter() - start
                    # Before the close: the session's thread (its CPU in task/*/schedstat) ends with the
                    # connection. Every reply has been received, so the server has nothing left to send.
                    cpu[record].append(cpu_seconds(child.pid) - before)
                    client.close()
                    digest = hashlib.sha256(buffer).hexdigest()
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
