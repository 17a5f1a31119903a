"""Sequential read through the kernel's vhci-hcd: vusb's USB/IP server vs the kernel's own usbip-host.

Both run in one boot of the kernel VM (QEMU/TCG), on the same 64 MiB image:
  reference  configfs f_mass_storage gadget on dummy_udc → usbip-host (usbipd + usbip bind) → 127.0.0.1 → vhci
  vusb       `vusb serve --disk IMAGE --read-only` (its own process) → 127.0.0.1 → vhci
The guest reads the whole disk with O_DIRECT 1 MiB reads (like `dd bs=1M iflag=direct`), several rounds,
verifies the bytes against the image (sha256), and the ratio vusb ÷ kernel is printed (target ≥ 1.3).

Run from the repository root: `.venv/bin/python tools/bench/bench_server_vm.py [--size-mb 64] [--rounds 3]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CHUNK = 1 << 20


def read_disk(dev: str, size: int) -> tuple[float, str]:
    """Seconds to read `size` bytes of `dev` with O_DIRECT 1 MiB reads (like dd), and their sha256 (hashed
    after the clock stops, so the guest CPU the hash needs does not count against either path)."""
    buf = mmap.mmap(-1, size)
    view = memoryview(buf)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        start = time.perf_counter()
        done = 0
        while done < size:
            n = os.readv(fd, [view[done : done + CHUNK]])
            if n <= 0:
                raise RuntimeError(f"short read from {dev} at {done}")
            done += n
        elapsed = time.perf_counter() - start
        digest = hashlib.sha256(view).hexdigest()
    finally:
        os.close(fd)
        view.release()
        buf.close()
    return elapsed, digest


def measure(dev: str, size: int, rounds: int, expected: str) -> list[float]:
    speeds = []
    for _ in range(rounds):
        elapsed, digest = read_disk(dev, size)
        if digest != expected:
            raise RuntimeError(f"{dev}: read back sha256 {digest} != image {expected}")
        speeds.append(size / elapsed / 1e6)
    return speeds


def guest_main(size_mb: int, rounds: int) -> dict[str, object]:
    from tools.vm import guest

    size = size_mb << 20
    guest.modprobe("usb-storage", "sd_mod", "vhci-hcd")
    image = guest.make_backing_file(Path("/tmp/bench.img"), size)
    expected = guest.sha256_of(image)
    results: dict[str, object] = {"size_mb": size_mb, "rounds": rounds}

    udc = guest.free_udc()
    hcd = guest.hcd_of_udc(udc)
    with guest.mass_storage_gadget(image, udc, read_only=True) as gadget:
        dev = guest.wait_for_usb_device(gadget.vendor_id, gadget.product_id, under=hcd)
        guest.wait_for_disk(hcd, timeout=60)
        with guest.usbipd() as daemon, guest.usbip_bound(dev.busid):
            guest.wait_for_disk_gone(hcd)
            with guest.usbip_attached("127.0.0.1", dev.busid, port=daemon.port):
                disk = guest.wait_for_disk("vhci_hcd", timeout=60)
                results["kernel_mb_s"] = measure(str(disk.dev), size, rounds, expected)
            guest.wait_for_disk_gone("vhci_hcd")

    port = 3300
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emulator.cli",
            "serve",
            "--disk",
            str(image),
            "--read-only",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        guest.wait_for_tcp("127.0.0.1", port, timeout=120)
        with guest.usbip_attached("127.0.0.1", "1-1", port=port):
            disk = guest.wait_for_disk("vhci_hcd", timeout=60)
            results["vusb_mb_s"] = measure(str(disk.dev), size, rounds, expected)
        guest.wait_for_disk_gone("vhci_hcd")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return results


def report(results: dict[str, object]) -> float:
    kernel = statistics.median(results["kernel_mb_s"])  # type: ignore[arg-type]
    vusb = statistics.median(results["vusb_mb_s"])  # type: ignore[arg-type]
    ratio = vusb / kernel
    print(
        f"sequential read, {results['size_mb']} MiB x {results['rounds']} rounds, O_DIRECT 1 MiB, in the TCG guest"
    )
    print(
        f"  kernel usbip-host + f_mass_storage → vhci: {kernel:7.1f} MB/s  (rounds {results['kernel_mb_s']})"
    )
    print(f"  vusb server → vhci:                        {vusb:7.1f} MB/s  (rounds {results['vusb_mb_s']})")
    print(f"  ratio vusb ÷ kernel: {ratio:.2f}  (target ≥ 1.3)")
    return ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.guest:
        print("VUSB-BENCH " + json.dumps(guest_main(args.size_mb, args.rounds)))
        return 0
    from tools.vm import run_in_vm

    res = run_in_vm(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--guest",
            "--size-mb",
            str(args.size_mb),
            "--rounds",
            str(args.rounds),
        ],
        cwd=ROOT,
        timeout=1200,
        env={"PYTHONPATH": str(ROOT)},
    )
    line = next((x for x in res.stdout.splitlines() if x.startswith("VUSB-BENCH ")), None)
    if res.returncode != 0 or line is None:
        print(res.stdout[-3000:], res.stderr[-3000:], sep="\n", file=sys.stderr)
        print(f"benchmark failed in the guest (exit {res.returncode})", file=sys.stderr)
        return 1
    report(json.loads(line.removeprefix("VUSB-BENCH ")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
