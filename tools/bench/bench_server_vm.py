"""Sequential read through the kernel's vhci-hcd: vusb's USB/IP server vs the kernel's own usbip-host.

All three run in one boot of the kernel VM (QEMU/TCG), on the same 64 MiB image:
  reference  configfs f_mass_storage gadget on dummy_udc → usbip-host (usbipd + usbip bind) → 127.0.0.1 → vhci
  vusb       `vusb serve --disk IMAGE --read-only` (its own process) → 127.0.0.1 → vhci
  PyPI       the PyPI `usbip` package (0.7.0, the `bench` extra): its `MSC` class on a file store that preads
             the image, served by its `USBIP` transport (its own process) → 127.0.0.1 → vhci
The guest reads the whole disk with O_DIRECT 1 MiB reads (like `dd bs=1M iflag=direct`), several rounds,
verifies the bytes against the image (sha256), and the ratios vusb ÷ kernel (target ≥ 1.3) and vusb ÷ PyPI
are printed. A missing PyPI package skips its line.

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

    vusb = [
        sys.executable,
        "-m",
        "emulator.cli",
        "serve",
        "--disk",
        str(image),
        "--read-only",
        "--port",
        "3300",
    ]
    results["vusb_mb_s"] = measure_server(vusb, 3300, size, rounds, expected)
    try:
        import usbip  # noqa: F401  (only to know whether the PyPI package is installed)
    except ImportError:
        results["pypi_missing"] = True
    else:
        pypi = [sys.executable, "-c", _PYPI_SERVER, str(image), "3301"]
        results["pypi_mb_s"] = measure_server(pypi, 3301, size, rounds, expected)
    return results


# The PyPI package's MSC class takes any object with block_size, num_blocks, read(lba, count), write(...).
_PYPI_SERVER = """
import os, sys, threading
from usbip import core
from usbip.classes.device.msc import MSC
from usbip.device import USBDevice
from usbip.transport import USBIP

class ImageFile:
    block_size = 512
    read_only = True

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDONLY)
        self.num_blocks = os.fstat(self.fd).st_size // self.block_size

    def read(self, lba, count):
        return os.pread(self.fd, count * self.block_size, lba * self.block_size)

    def write(self, lba, count, data):
        raise OSError("read-only")

device = USBDevice(0x1209, 0x0004, product="PyPI usbip disk", serial="0123456789AB")
device.set_speed(core.SPEED_HIGH)
device.add(MSC(ImageFile(sys.argv[1]), read_only=True))
device.plug(via=USBIP("127.0.0.1", int(sys.argv[2])))
threading.Event().wait()
"""


def measure_server(argv: list[str], port: int, size: int, rounds: int, expected: str) -> list[float]:
    """Start a userspace USB/IP server (its own process), attach its 1-1 through vhci, measure, detach."""
    from tools.vm import guest

    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        guest.wait_for_tcp("127.0.0.1", port, timeout=120)
        with guest.usbip_attached("127.0.0.1", "1-1", port=port):
            disk = guest.wait_for_disk("vhci_hcd", timeout=60)
            speeds = measure(str(disk.dev), size, rounds, expected)
        guest.wait_for_disk_gone("vhci_hcd")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return speeds


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
    if "pypi_mb_s" in results:
        pypi = statistics.median(results["pypi_mb_s"])  # type: ignore[arg-type]
        print(
            f"  PyPI usbip 0.7.0 server → vhci:            {pypi:7.1f} MB/s  (rounds {results['pypi_mb_s']})"
        )
    print(f"  ratio vusb ÷ kernel: {ratio:.2f}  (target ≥ 1.3)")
    if "pypi_mb_s" in results:
        print(f"  ratio vusb ÷ PyPI:   {vusb / pypi:.2f}   (PyPI ÷ kernel: {pypi / kernel:.2f})")
    else:
        print("  PyPI usbip server: not measured (pip install '.[bench]' for the comparison)")
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
