"""What recording costs the server: 64 MiB of sequential READ(10) with `--record` on ÷ off (a script, not a test).

vusb's server runs in a child process (`vusb serve --disk IMAGE --read-only`, plus `--record FILE` for the
recorded runs) exporting an image of random data; this process reads all of it with a raw-socket client that
keeps several READ(10) commands in flight (CBW + data + CSW URBs of `--depth` commands queued ahead, each
command's data in one 64 KiB URB; tools/bench/rawclient.py), so the server, not the client, sets the
pace; the bytes land in one buffer and are hashed after the clock stops. Runs alternate off/on, the
fastest of `--repeat` counts for each; every run checks the bytes (sha256) and every recording is checked to
hold the whole transfer (`captures.transactions.analyze`: every READ(10) paired, its data bytes counted).

It prints MiB/s off and on, the ratio on ÷ off (target >= 0.9), and the recording's size and frames. Then,
measured in the same run, what bounds that ratio on this machine:

* the floor: copying the image's bytes into a fresh file beside the recording (one `copy_file_range`, the
  recorder's own way for read-only images, and `write()` from a buffer in memory, 64 KiB a call), the least
  any recording of those bytes costs; the best ratio the arithmetic allows when that copy runs in series with
  the server's work (off time ÷ (off time + floor)), as the recorder's durability rule has it, and if it cost
  the server nothing and ran on another core (off time ÷ the CPU time of server, client and floor shared
  over the machine's cores, or the off time);
* the same read recorded to /dev/null: all of the recorder's work but the file's (framing, and the READ data
  read, since copy_file_range cannot copy into /dev/null), and with it and the floor in series, the best
  ratio the recorder's framing leaves;
* the same read of an image served writable (no `--read-only`: no sendfile, the READ data goes through
  Python as bytes), off and on, for the ratio where the server's own path already copies the data.

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


def serve(image: Path, record: Path | None, read_only: bool = True) -> tuple[subprocess.Popen[str], int]:
    args = [sys.executable, "-m", "emulator.cli", "serve", "--port", "0", "--disk", str(image)]
    if read_only:
        args.append("--read-only")
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


class Run:
    """One read of the whole image from a fresh `vusb serve`: wall seconds, server and client CPU seconds."""

    def __init__(self, image: Path, size: int, depth: int, expected: str, record: Path | None,
                 read_only: bool) -> None:
        child, port = serve(image, record, read_only)
        try:
            client = RawClient(port)
            buffer = bytearray(size)
            before = cpu_seconds(child.pid)
            start, client_start = time.perf_counter(), time.process_time()
            client.read(memoryview(buffer), chunk=CHUNK, depth=depth)
            self.seconds = time.perf_counter() - start
            self.client_cpu = time.process_time() - client_start
            # Before the close: the session's thread (its CPU in task/*/schedstat) ends with the
            # connection. Every reply has been received, so the server has nothing left to send.
            self.server_cpu = cpu_seconds(child.pid) - before
            client.close()
            digest = hashlib.sha256(buffer).hexdigest()
        finally:
            stop(child)
        if digest != expected:
            raise SystemExit("wrong bytes read")


def check_recording(recording: Path, size: int) -> tuple[int, int]:
    """The recording's frames and bytes, once `analyze` found every READ(10) and all of its data in it."""
    analysis = analyze(recording)
    reads = [c for c in analysis.scsi_commands if c.name == "READ_10"]
    data = sum(c.data_bytes or 0 for c in reads)
    if len(reads) != size // CHUNK or data != size:
        raise SystemExit(f"the recording holds {len(reads)} READ(10) and {data} bytes, "
                         f"not {size // CHUNK} and {size}")
    return analysis.frames, recording.stat().st_size


def floor_copies(image: Path, directory: Path, size: int) -> tuple[float, float]:
    """Seconds to copy the image into a fresh file in `directory` (the recording's filesystem): with
    copy_file_range (one call per 64 KiB, as the recorder copies a READ's data), and with write() of 64 KiB
    from a buffer already in memory. The copies are deleted after each measurement."""
    target = directory / "floor.copy"
    data = memoryview(image.read_bytes())
    times = []
    for how in ("copy_file_range", "write"):
        source = os.open(image, os.O_RDONLY)
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            start = time.perf_counter()
            for offset in range(0, size, CHUNK):
                if how == "write":
                    os.write(out, data[offset : offset + CHUNK])
                else:
                    os.copy_file_range(source, out, CHUNK, offset)
            times.append(time.perf_counter() - start)
        finally:
            os.close(source)
            os.close(out)
            target.unlink()
    return times[0], times[1]


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
        recording = Path(tmp) / "session.pcapng"
        # (read_only, record) -> the runs
        runs: dict[tuple[bool, bool], list[Run]] = {(ro, rec): [] for ro in (True, False) for rec in (False, True)}
        floors: list[tuple[float, float]] = []
        nulls: list[Run] = []
        print(f"vusb serve (child process), {args.size_mib} MiB sequential READ(10) of {CHUNK // 1024} KiB, "
              f"{args.depth} commands in flight, best of {args.repeat}\n")
        for number in range(1, args.repeat + 1):
            for read_only, record in runs:
                recording.unlink(missing_ok=True)
                run = Run(image, size, args.depth, expected, recording if record else None, read_only)
                runs[read_only, record].append(run)
                print(f"  run {number} {'read-only' if read_only else 'writable '} recording "
                      f"{'on ' if record else 'off'}: {size / MIB / run.seconds:7.1f} MiB/s, server CPU "
                      f"{run.server_cpu * 1000:4.0f} ms, client CPU {run.client_cpu * 1000:4.0f} ms")
                if record:
                    frames, file_size = check_recording(recording, size)
            recording.unlink(missing_ok=True)
            nulls.append(Run(image, size, args.depth, expected, Path(os.devnull), True))
            print(f"  run {number} read-only recording to {os.devnull}: {size / MIB / nulls[-1].seconds:7.1f} MiB/s, "
                  f"server CPU {nulls[-1].server_cpu * 1000:4.0f} ms")
            floors.append(floor_copies(image, Path(tmp), size))
            print(f"  run {number} floor: copy_file_range {floors[-1][0] * 1000:.1f} ms, "
                  f"write {floors[-1][1] * 1000:.1f} ms")

    def best(read_only: bool, record: bool) -> Run:
        return min(runs[read_only, record], key=lambda r: r.seconds)

    def least(read_only: bool, record: bool, what: str) -> float:
        return min(getattr(r, what) for r in runs[read_only, record]) * 1000

    off, on = best(True, False), best(True, True)
    rate_off, rate_on = size / MIB / off.seconds, size / MIB / on.seconds
    print(f"\nrecording off: {rate_off:8.1f} MiB/s")
    print(f"recording on:  {rate_on:8.1f} MiB/s   ({frames} frames, {file_size / MIB:.1f} MiB of pcapng; "
          f"every READ(10) and its {CHUNK // 1024} KiB found by analyze())")
    print(f"ratio on / off = {rate_on / rate_off:.3f}   (target >= 0.9)")
    print(f"server CPU for the {args.size_mib} MiB (all threads, least of the runs): off "
          f"{least(True, False, 'server_cpu'):.0f} ms, on {least(True, True, 'server_cpu'):.0f} ms (the "
          f"recorder's share: {least(True, True, 'server_cpu') - least(True, False, 'server_cpu'):.0f} ms; the "
          f"machine has {os.cpu_count()} CPUs for server and client)")

    copy = min(f[0] for f in floors)
    write = min(f[1] for f in floors)
    floor = min(copy, write)
    cores = os.cpu_count() or 1
    # the fastest off run's CPU, with the floor's copy added to it, shared over every core
    shared = (off.server_cpu + off.client_cpu + floor) / cores
    print(f"\nFLOOR: {args.size_mib} MiB into a fresh file beside the recording: copy_file_range {copy * 1000:.1f} ms, "
          f"write() from memory {write * 1000:.1f} ms (least of the runs)")
    print(f"  best ratio with that copy in series with the server: off {off.seconds * 1000:.1f} ms / "
          f"(off + {floor * 1000:.1f} ms) = {off.seconds / (off.seconds + floor):.3f}")
    print("  (the recorder's rule, a reply's frames in the page cache before the reply is sent, puts it in series)")
    print(f"  best ratio if the copy cost the server nothing and ran on another core: the off run used "
          f"{off.server_cpu * 1000:.0f} ms server + {off.client_cpu * 1000:.0f} ms client CPU in "
          f"{off.seconds * 1000:.1f} ms; with the floor, {shared * 1000:.1f} ms of work per core on {cores} -> "
          f"{off.seconds / max(off.seconds, shared):.3f}")

    null_cpu = min(r.server_cpu for r in nulls)
    framing = max(0.0, null_cpu - least(True, False, "server_cpu") / 1000)
    print(f"\nrecording to {os.devnull} (the recorder without its file): server CPU {null_cpu * 1000:.0f} ms, so "
          f"{framing * 1000:.0f} ms of the recorder's share is framing and reading, "
          f"{least(True, True, 'server_cpu') - null_cpu * 1000:.0f} ms the recording file's")
    print(f"  best ratio with that and the floor in series: off {off.seconds * 1000:.1f} ms / (off + "
          f"{framing * 1000:.1f} + {floor * 1000:.1f} ms) = {off.seconds / (off.seconds + framing + floor):.3f}")

    rw_off, rw_on = best(False, False), best(False, True)
    print(f"\nread-write image (no sendfile: READ data through Python): off {size / MIB / rw_off.seconds:.1f} "
          f"MiB/s, on {size / MIB / rw_on.seconds:.1f} MiB/s, ratio {rw_off.seconds / rw_on.seconds:.3f}; server "
          f"CPU off {least(False, False, 'server_cpu'):.0f} ms, on {least(False, True, 'server_cpu'):.0f} ms")


if __name__ == "__main__":
    main()
