"""Dissection speed: vusb's pairing (`captures.transactions.analyze`) against tshark on the same files, in one run
(a script, not a test).

Files: 100k-record captures made by `captures.synth` (USB/IP over TCP and usbmon, pcapng), one made by
`captures.record` from a synthetic session fed through the recorder (its framing and comments), and the real
kernel samples in captures/samples/. For each: vusb's records per second (USB/IP messages or usbmon records,
dissected and paired into transactions and SCSI commands; file read included; the fastest of --repeat runs),
target >= 200k/s on the 100k-record files, and tshark's wall time for a one-field pass over the same file,
measured here:

    tshark -r FILE -d tcp.port==3240,usbip -T fields -e usbip.sequence_no > /dev/null     (usbmon: -e usb.urb_id)

(tshark 4.0 names the USB/IP sequence number `usbip.sequence_no`; there is no `usbip.seqnum`.)

    .venv/bin/python tools/bench/bench_dissect.py [--records 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from captures import synth  # noqa: E402
from captures.record import PcapngRecorder  # noqa: E402
from captures.transactions import analyze  # noqa: E402

TARGET = 200_000


def recorded_capture(path: Path, commands: int) -> None:
    """A capture written by `captures.record`: the messages of a synthetic session, fed to the recorder's tap
    a socket read or write at a time (the client's three CMD_SUBMITs of a command together, as vusb's host
    sends them; each RET_SUBMIT alone)."""
    with PcapngRecorder(path, mode="server", address="benchmark") as recorder:
        tap = recorder.tap
        tap.opened(1, ("127.0.0.1", 50000), ("127.0.0.1", 3240))
        pending = bytearray()
        for _ts, frame in list(synth.usbip_mass_storage_frames(commands))[3:]:
            to_server = struct.unpack_from(">H", frame, 36)[0] == 3240
            if to_server:
                pending += frame[54:]
                continue
            if pending:
                tap.data(1, True, bytes(pending))
                pending.clear()
            tap.data(1, False, frame[54:])
        tap.closed(1, "end of the benchmark session")


def vusb_rate(path: Path, repeat: int) -> tuple[int, float]:
    """(records, best seconds) of `analyze` on the file."""
    best = float("inf")
    records = 0
    for _ in range(repeat):
        start = time.perf_counter()
        analysis = analyze(path)
        best = min(best, time.perf_counter() - start)
        records = analysis.records
        if not analysis.transactions:
            raise SystemExit(f"{path}: nothing paired")
    return records, best


def tshark_seconds(path: Path, field: str, repeat: int) -> float | None:
    tshark = shutil.which("tshark")
    if tshark is None:
        return None
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([tshark, "-r", str(path), "-d", "tcp.port==3240,usbip", "-T", "fields", "-e", field],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=1800)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="records in the made-up captures")
    parser.add_argument("--repeat", type=int, default=3, help="runs per file; the fastest counts")
    args = parser.parse_args()
    commands = args.records // 6  # six USB/IP messages (or usbmon records) per READ(10)

    with tempfile.TemporaryDirectory(prefix="vusb-bench-dissect-") as tmp:
        files: list[tuple[str, Path, str, bool]] = []  # (label, path, tshark field, counts toward the target)
        synthetic_usbip = Path(tmp) / "synth-usbip.pcapng"
        synthetic_usbip.write_bytes(synth.usbip_capture(commands))
        files.append(("synth USB/IP over TCP", synthetic_usbip, "usbip.sequence_no", True))
        synthetic_usbmon = Path(tmp) / "synth-usbmon.pcapng"
        synthetic_usbmon.write_bytes(synth.usbmon_capture(commands))
        files.append(("synth usbmon (mmapped)", synthetic_usbmon, "usb.urb_id", True))
        recorded = Path(tmp) / "recorded.pcapng"
        recorded_capture(recorded, commands)
        files.append(("captures.record output", recorded, "usbip.sequence_no", True))
        for sample in sorted((REPO / "captures" / "samples").glob("*.pcapng")):
            field = "usb.urb_id" if "usbmon" in sample.name else "usbip.sequence_no"
            files.append((f"sample {sample.name}", sample, field, False))

        print(f"{'file':48s} {'records':>8s} {'vusb s':>8s} {'records/s':>11s} {'tshark s':>9s} "
              f"{'tshark/vusb':>11s}")
        worst = float("inf")
        for label, path, field, counted in files:
            records, seconds = vusb_rate(path, args.repeat)
            rate = records / seconds
            if counted:
                worst = min(worst, rate)
            reference = tshark_seconds(path, field, 1 if counted else args.repeat)
            shown = f"{reference:9.3f} {reference / seconds:10.1f}x" if reference is not None else f"{'-':>9s}"
            print(f"{label:48s} {records:8d} {seconds:8.4f} {rate:11,.0f} {shown}")
        print(f"\nslowest made-up capture: {worst:,.0f} records/s (target >= {TARGET:,}) — "
              f"{'met' if worst >= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
