"""Sequential read through the kernel's vhci-hcd: vusb's USB/IP server vs the kernel's own usbip-host.

All paths run in one boot of the kernel VM (QEMU/TCG), on the same 64 MiB image:
  kernel     configfs f_mass_storage gadget on dummy_udc → usbip-host (usbipd + usbip bind) → 127.0.0.1 → vhci.
             dummy_hcd is loaded SuperSpeed-capable (`is_super_speed=Y`) unless `--reference-speed high`, so
             the reference runs at the same speed as vusb's default disk.
  vusb       `vusb serve --disk IMAGE --read-only` (its own process; a SuperSpeed disk, the default) → vhci
  vusb-hs    the same with `--speed high` (a USB 2 disk: usb-storage gives it 120 KiB commands, not 1 MiB)
  vusb-rw    a writable copy of the image, SuperSpeed (READ data is read into Python, not sendfile'd: a
             writable image could change under pages still queued in the socket)
  PyPI       the PyPI `usbip` package (0.7.0, the `bench` extra): its `MSC` class (high speed) on a file store
             that preads the image, served by its `USBIP` transport (its own process) → 127.0.0.1 → vhci
All are attached at once and each round reads every disk, the paths taking turns every 8 MiB, so a burst
of load on the (shared) host slows all paths alike rather than whichever was being read. The guest reads the
whole disk with O_DIRECT 1 MiB reads (like `dd bs=1M iflag=direct`), verifies the bytes against the image
(sha256). Ratios are medians of the per-round ratios: the target (≥ 1.3) is vusb ÷ kernel at the same speed;
vusb-hs ÷ PyPI compares the two userspace servers like for like. A missing PyPI package skips its line.

Run from the repository root:
`.venv/bin/python tools/bench/bench_server_vm.py [--size-mb 64] [--rounds 5] [--reference-speed super|high]`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import mmap
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools.bench.common import PYPI_SERVER, cpu_seconds, emit, run_guest  # noqa: E402

CHUNK = 1 << 20


SEGMENT = 8 << 20  # each round reads every path's disk in turns of this much


def measure_round(devs: dict[str, str], size: int, expected: str) -> dict[str, float]:
    """One round: every disk read whole with O_DIRECT 1 MiB reads (like dd), the paths taking turns every
    SEGMENT bytes so that load on the shared host falls on all of them alike. MB/s per path; each path's
    bytes are checked against the image's sha256 after its clock stopped."""
    bufs = {name: mmap.mmap(-1, size) for name in devs}
    views = {name: memoryview(buf) for name, buf in bufs.items()}
    fds = {name: os.open(dev, os.O_RDONLY | os.O_DIRECT) for name, dev in devs.items()}
    elapsed = dict.fromkeys(devs, 0.0)
    try:
        for segment in range(0, size, SEGMENT):
            for name, fd in fds.items():
                view = views[name]
                start = time.perf_counter()
                done = segment
                while done < min(segment + SEGMENT, size):
                    n = os.preadv(fd, [view[done : done + CHUNK]], done)
                    if n <= 0:
                        raise RuntimeError(f"short read from {devs[name]} at {done}")
                    done += n
                elapsed[name] += time.perf_counter() - start
        for name, view in views.items():
            digest = hashlib.sha256(view).hexdigest()
            if digest != expected:
                raise RuntimeError(f"{devs[name]} ({name}): read back sha256 {digest} != image {expected}")
    finally:
        for fd in fds.values():
            os.close(fd)
        for name, view in views.items():
            view.release()
            bufs[name].close()
    return {name: size / seconds / 1e6 for name, seconds in elapsed.items()}


def guest_main(size_mb: int, rounds: int, reference_speed: str) -> dict[str, object]:
    """All paths attached at once and read in turns (see `measure_round`)."""
    from tools.vm import guest

    size = size_mb << 20
    guest.modprobe("usb-storage", "sd_mod", "vhci-hcd")
    image = guest.make_backing_file(Path("/tmp/bench.img"), size)
    expected = guest.sha256_of(image)
    results: dict[str, object] = {"size_mb": size_mb, "rounds": rounds, "reference_speed": reference_speed}
    disks: dict[str, str] = {}

    def attach(stack: contextlib.ExitStack, name: str, busid: str, port: int) -> None:
        before = {d.dev for d in guest.block_disks() if "vhci_hcd" in d.sysfs_path}
        stack.enter_context(guest.usbip_attached("127.0.0.1", busid, port=port))
        disk = guest.wait_for_disk(lambda d: "vhci_hcd" in d.sysfs_path and d.dev not in before, timeout=60)
        disks[name] = str(disk.dev)

    if reference_speed == "super":
        guest.modprobe("dummy_hcd", num=2, is_super_speed="Y")
    udc = guest.free_udc()
    hcd = guest.hcd_of_udc(udc)
    with contextlib.ExitStack() as stack:
        gadget = stack.enter_context(guest.mass_storage_gadget(image, udc, read_only=True))
        dev = guest.wait_for_usb_device(gadget.vendor_id, gadget.product_id, under=hcd)
        results["kernel_link_mbps"] = int(Path(dev.sysfs_path, "speed").read_text())
        guest.wait_for_disk(hcd, timeout=60)
        daemon = stack.enter_context(guest.usbipd())
        stack.enter_context(guest.usbip_bound(dev.busid))
        guest.wait_for_disk_gone(hcd)
        attach(stack, "kernel", dev.busid, daemon.port)

        serve = [sys.executable, "-m", "emulator.cli", "serve", "--disk", str(image), "--read-only"]
        procs = {"vusb": stack.enter_context(server_process([*serve, "--port", "3300"], 3300))}
        attach(stack, "vusb", "1-1", 3300)
        procs["vusb_hs"] = stack.enter_context(server_process([*serve, "--port", "3302", "--speed", "high"], 3302))
        attach(stack, "vusb_hs", "1-1", 3302)
        writable = Path("/tmp/bench-rw.img")  # its own copy: a writable image is locked for one exporter
        shutil.copyfile(image, writable)
        procs["vusb_rw"] = stack.enter_context(
            server_process([*serve[:-3], "--disk", str(writable), "--port", "3303"], 3303)
        )
        attach(stack, "vusb_rw", "1-1", 3303)
        try:
            import usbip  # noqa: F401  (only to know whether the PyPI package is installed)
        except ImportError:
            results["pypi_missing"] = True
        else:
            procs["pypi"] = stack.enter_context(
                server_process([sys.executable, "-c", PYPI_SERVER, str(image), "3301"], 3301)
            )
            attach(stack, "pypi", "1-1", 3301)

        for name in disks:
            results[f"{name}_mb_s"] = []
        cpu_before = {name: cpu_seconds(proc.pid) for name, proc in procs.items()}
        for _ in range(rounds):
            for name, speed in measure_round(disks, size, expected).items():
                speeds = results[f"{name}_mb_s"]
                assert isinstance(speeds, list)
                speeds.append(speed)
        for name, proc in procs.items():  # the server's own CPU (all threads) per MiB read through it
            results[f"{name}_cpu_ms_per_mib"] = (cpu_seconds(proc.pid) - cpu_before[name]) * 1e3 / (size_mb * rounds)
    guest.wait_for_disk_gone("vhci_hcd")
    return results


@contextlib.contextmanager
def server_process(argv: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A userspace USB/IP server in its own process, listening on `port` for the block; stopped after."""
    from tools.vm import guest

    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def up() -> bool:
            if server.poll() is not None:
                err = server.stderr.read().decode(errors="replace") if server.stderr else ""
                raise RuntimeError(f"{argv[:6]}... exited {server.returncode}: {err[-500:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        guest.poll(up, timeout=120, what=f"a server on port {port}")
        yield server
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


PATHS = {
    "kernel": "kernel usbip-host + f_mass_storage → vhci",
    "vusb": "vusb server (SuperSpeed disk) → vhci",
    "vusb_hs": "vusb server --speed high → vhci",
    "vusb_rw": "vusb server, read-write disk (no sendfile) → vhci",
    "pypi": "PyPI usbip 0.7.0 server (high speed) → vhci",
}


def report(results: dict[str, object]) -> float:
    """Medians per path, and the median of the per-round ratios (each round reads every path once, so a
    round's ratio compares paths under the same load)."""
    speeds: dict[str, list[float]] = {
        name: results[f"{name}_mb_s"]  # type: ignore[misc]
        for name in PATHS
        if f"{name}_mb_s" in results
    }

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(speeds[a], speeds[b], strict=True))

    link = results.get("kernel_link_mbps")
    print(
        f"sequential read, {results['size_mb']} MiB x {results['rounds']} rounds (paths read in turn each round), "
        f"O_DIRECT 1 MiB, in the TCG guest; kernel reference gadget linked at {link} Mb/s"
    )
    for name, label in PATHS.items():
        if name in speeds:
            rounds = ", ".join(f"{x:.1f}" for x in speeds[name])
            cpu = results.get(f"{name}_cpu_ms_per_mib")
            cpu_text = "" if cpu is None else f", server CPU {cpu:.1f} ms/MiB"
            print(f"  {label + ':':52} {statistics.median(speeds[name]):7.1f} MB/s  (rounds {rounds}{cpu_text})")
    same = "vusb" if results["reference_speed"] == "super" else "vusb_hs"
    other = "vusb_hs" if same == "vusb" else "vusb"
    headline = ratio(same, "kernel")
    print(f"  ratio {PATHS[same].split(' →')[0]} ÷ kernel, same speed: {headline:.2f}  (target ≥ 1.3)")
    print(f"  ratio {PATHS[other].split(' →')[0]} ÷ kernel: {ratio(other, 'kernel'):.2f}")
    if "pypi" in speeds:
        print(f"  ratio vusb-hs ÷ PyPI (both high speed): {ratio('vusb_hs', 'pypi'):.2f}"
              f"   (PyPI ÷ kernel: {ratio('pypi', 'kernel'):.2f})")
    else:
        print("  PyPI usbip server: not measured (pip install '.[bench]' for the comparison)")
    return headline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reference-speed", choices=("super", "high"), default="super",
                        help="speed of dummy_hcd, hence of the kernel's reference gadget")
    parser.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.guest:
        emit(guest_main(args.size_mb, args.rounds, args.reference_speed))
        return 0
    results = run_guest(Path(__file__).resolve(), ["--size-mb", str(args.size_mb), "--rounds", str(args.rounds),
                                                   "--reference-speed", args.reference_speed], timeout=1200)
    if results is None:
        return 1
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
