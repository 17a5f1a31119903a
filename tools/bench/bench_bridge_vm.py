"""The gadget bridge against the kernel's vhci path, on the same kernel-exported device, in one VM boot.

The remote is always the kernel's: a configfs f_mass_storage gadget on dummy_udc.0 (a read-only 64 MiB
image), exported by usbip-host (`usbipd` + `usbip bind`). It is imported twice, one after the other:
  reference  `usbip attach` → vhci-hcd → usb-storage
  bridge     `vusb attach` (its own process) → a FunctionFS gadget on dummy_udc.1 → usb-storage
On each the guest measures
  * a sequential read of the whole disk with O_DIRECT 1 MiB reads (like `dd bs=1M iflag=direct`), several
    rounds, every round checked against the image (sha256): ratio bridge ÷ vhci, target ≥ 0.8;
  * control-transfer round trips through libusb (pyusb) on the local device node, usb-storage detached:
    GET_MAX_LUN (a class request that travels to the remote device on both paths: the number that counts,
    p99 ratio bridge ÷ vhci, target ≤ 2) and GET_DESCRIPTOR(DEVICE) (on the bridge libcomposite answers it
    locally, on vhci it travels: shown for completeness).

A third run gives the floor under the bridge's local half: the same image served by vusb's Python model
through FunctionFS (`vusb emulate --gadget mass-storage`) on the same UDC, with no USB/IP at all.

`--profile` runs the bridge under cProfile (every thread) during the read rounds and prints where its time
went. Run from the repository root: `.venv/bin/python tools/bench/bench_bridge_vm.py [--size-mb 64]
[--rounds 3] [--iterations 1000] [--profile]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CHUNK = 1 << 20
BRIDGE_UDC = "dummy_udc.1"
BRIDGE_NAME = "vusb-bench-bridge"
US_BULK_GET_MAX_LUN = 0xFE
GET_DESCRIPTOR, DT_DEVICE = 0x06, 0x01


# --- measurements (guest side) ----------------------------------------------------------------------------


def read_disk(dev: str, size: int) -> tuple[float, str]:
    """Seconds to read `size` bytes of `dev` with O_DIRECT 1 MiB reads, and their sha256 (hashed after the
    clock stops)."""
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


def measure_read(dev: str, size: int, rounds: int, expected: str) -> list[float]:
    speeds = []
    for _ in range(rounds):
        elapsed, digest = read_disk(dev, size)
        if digest != expected:
            raise RuntimeError(f"{dev}: read back sha256 {digest} != image {expected}")
        speeds.append(round(size / elapsed / 1e6, 2))
    return speeds


def measure_control(sysfs_path: str, iterations: int) -> dict[str, list[float]]:
    """Round-trip times (µs) of GET_MAX_LUN and GET_DESCRIPTOR(DEVICE) through libusb on the device at
    `sysfs_path`; usb-storage is detached from interface 0 first (an interface request needs it claimed)."""
    import usb.core
    import usb.util

    busnum = int(Path(sysfs_path, "busnum").read_text())
    devnum = int(Path(sysfs_path, "devnum").read_text())
    dev = usb.core.find(bus=busnum, address=devnum)
    if dev is None:
        raise RuntimeError(f"libusb does not see bus {busnum} device {devnum}")
    if dev.is_kernel_driver_active(0):
        dev.detach_kernel_driver(0)
    usb.util.claim_interface(dev, 0)
    requests = {
        "get_max_lun": (0xA1, US_BULK_GET_MAX_LUN, 0, 0, 1),
        "get_descriptor_device": (0x80, GET_DESCRIPTOR, DT_DEVICE << 8, 0, 18),
    }
    times: dict[str, list[float]] = {}
    try:
        for name, (request_type, request, value, index, length) in requests.items():
            samples = []
            for i in range(iterations + 20):
                start = time.perf_counter()
                answer = dev.ctrl_transfer(request_type, request, value, index, length, timeout=5000)
                elapsed = time.perf_counter() - start
                if len(answer) != length:
                    raise RuntimeError(f"{name}: {len(answer)} bytes, not {length}")
                if i >= 20:  # the first ones warm caches and pyusb's paths
                    samples.append(round(elapsed * 1e6, 1))
            times[name] = samples
    finally:
        usb.util.release_interface(dev, 0)
        usb.util.dispose_resources(dev)
    return times


def control_in_subprocess(sysfs_path: str, iterations: int) -> dict[str, list[float]]:
    """`measure_control` in a fresh process: libusb (built for udev) learns of devices that appear later only
    through udevd, which the guest does not run, so one libusb context would never see the second device."""
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--control-of", sysfs_path,
                          "--iterations", str(iterations)], capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"control measurement failed: {res.stderr[-2000:]}")
    times: dict[str, list[float]] = json.loads(res.stdout.strip().splitlines()[-1])
    return times


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time a process has used so far (/proc/PID/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


# --- the two paths (guest side) ---------------------------------------------------------------------------


def guest_main(size_mb: int, rounds: int, iterations: int, profile: bool) -> dict[str, object]:
    from tools.vm import guest

    size = size_mb << 20
    guest.modprobe("usb-storage", "sd_mod", "vhci-hcd")
    remote_udc, local_udc = guest.dummy_udcs(2)[:2]
    remote_hcd, local_hcd = guest.hcd_of_udc(remote_udc), guest.hcd_of_udc(local_udc)
    image = guest.make_backing_file(Path("/tmp/bench-bridge.img"), size)
    expected = guest.sha256_of(image)
    results: dict[str, object] = {"size_mb": size_mb, "rounds": rounds, "iterations": iterations}

    def progress(key: str) -> None:  # on stderr as it comes, so a failure later still shows it
        value = results[key]
        if isinstance(value, dict):
            value = {k: (percentile(v, 50), percentile(v, 99)) for k, v in value.items()}
        print(f"[bench] {key}: {value}", file=sys.stderr, flush=True)

    with guest.mass_storage_gadget(image, remote_udc, read_only=True) as gadget:
        dev = guest.wait_for_usb_device(gadget.vendor_id, gadget.product_id, under=remote_hcd)
        guest.wait_for_disk(remote_hcd, timeout=60)
        with guest.usbipd() as daemon, guest.usbip_bound(dev.busid):
            guest.wait_for_disk_gone(remote_hcd)

            with guest.usbip_attached("127.0.0.1", dev.busid, port=daemon.port):
                disk = guest.wait_for_disk("vhci_hcd", timeout=60)
                results["vhci_read_mb_s"] = measure_read(str(disk.dev), size, rounds, expected)
                progress("vhci_read_mb_s")
                (local,) = guest.usb_devices("vhci_hcd")
                results["vhci_control_us"] = control_in_subprocess(local.sysfs_path, iterations)
                progress("vhci_control_us")
            guest.wait_for_disk_gone("vhci_hcd")

            argv = ["attach", "-r", "127.0.0.1", "-b", dev.busid, "--tcp-port", str(daemon.port),
                    "--udc", local_udc, "--name", BRIDGE_NAME]
            profile_path = Path("/tmp/bench-bridge.prof")
            command = [sys.executable, "-m", "emulator.cli", *argv]
            if profile:
                command = [sys.executable, str(Path(__file__).resolve()), "--profile-to", str(profile_path),
                           "--", *argv]
            bridge = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                disk = guest.wait_for_disk(local_hcd, timeout=120)
                cpu_before = cpu_seconds(bridge.pid)
                results["bridge_read_mb_s"] = measure_read(str(disk.dev), size, rounds, expected)
                progress("bridge_read_mb_s")
                results["max_sectors_kb"] = int(Path(f"/sys/block/{disk.name}/queue/max_sectors_kb").read_text())
                commands = rounds * size / (results["max_sectors_kb"] << 10)  # type: ignore[operator]
                user, system = (after - before for after, before in zip(cpu_seconds(bridge.pid), cpu_before,
                                                                        strict=True))
                results["bridge_cpu_ms_per_command"] = {"user": round(user / commands * 1e3, 2),
                                                         "system": round(system / commands * 1e3, 2)}
                (local,) = guest.usb_devices(local_hcd)
                results["bridge_control_us"] = control_in_subprocess(local.sysfs_path, iterations)
                progress("bridge_control_us")
            finally:
                bridge.send_signal(signal.SIGTERM)
                try:
                    output, _ = bridge.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    bridge.kill()
                    output, _ = bridge.communicate()
            if bridge.returncode != 0:
                raise RuntimeError(f"vusb attach exited {bridge.returncode}: {output[-2000:]}")
            guest.wait_for_disk_gone(local_hcd)
            if profile:
                results["profile"] = profile_report(profile_path)

    # The floor under the bridge's local half: the same image served by vusb's own Python mass-storage model
    # through FunctionFS on the same UDC, no USB/IP at all (every answer the bridge gives pays this too).
    model = subprocess.Popen([sys.executable, "-m", "emulator.cli", "emulate", "--gadget", "mass-storage", "--disk",
                              str(image), "--read-only", "--udc", local_udc, "--name", "vusb-bench-local"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        disk = guest.wait_for_disk(local_hcd, timeout=120)
        results["ffs_local_read_mb_s"] = measure_read(str(disk.dev), size, 1, expected)
        progress("ffs_local_read_mb_s")
        (device,) = guest.usb_devices(local_hcd)
        results["ffs_local_control_us"] = control_in_subprocess(device.sysfs_path, iterations)
        progress("ffs_local_control_us")
    finally:
        model.send_signal(signal.SIGTERM)
        try:
            model.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            model.kill()
            model.communicate()
    return results


# --- profiling the bridge process (cProfile on every thread) ----------------------------------------------


def profile_attach(out: Path, argv: list[str]) -> int:
    """Run `vusb ARGV` with a cProfile per thread (the FunctionFS loop and the USB/IP loop are threads of
    their own); the merged statistics go to `out` when the process ends."""
    import cProfile
    import threading

    profiles: list[cProfile.Profile] = []
    original_run = threading.Thread.run

    def profiled_run(self: threading.Thread) -> None:
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()
        try:
            original_run(self)
        finally:
            profile.disable()

    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    main_profile = cProfile.Profile()
    profiles.append(main_profile)
    from emulator.cli import main as vusb_main

    main_profile.enable()
    try:
        vusb_main(argv)  # exits with vusb's status
    finally:
        main_profile.disable()
        import pstats

        stats = pstats.Stats(profiles[0])
        for profile in profiles[1:]:
            stats.add(profile)
        stats.dump_stats(str(out))
    return 0


def profile_report(path: Path, top: int = 30) -> str:
    import io
    import pstats

    text = io.StringIO()
    stats = pstats.Stats(str(path), stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


# --- the host side ----------------------------------------------------------------------------------------


def report(results: dict[str, object]) -> tuple[float, float]:
    vhci = statistics.median(results["vhci_read_mb_s"])  # type: ignore[arg-type]
    bridge = statistics.median(results["bridge_read_mb_s"])  # type: ignore[arg-type]
    read_ratio = bridge / vhci
    print(f"sequential read, {results['size_mb']} MiB x {results['rounds']} rounds, O_DIRECT 1 MiB, TCG guest "
          f"(usb-storage max_sectors_kb {results.get('max_sectors_kb')})")
    print(f"  kernel usbip-host → vhci-hcd:           {vhci:7.1f} MB/s  (rounds {results['vhci_read_mb_s']})")
    print(f"  kernel usbip-host → vusb bridge gadget: {bridge:7.1f} MB/s  (rounds {results['bridge_read_mb_s']})")
    print(f"  ratio bridge ÷ vhci: {read_ratio:.2f}  (target ≥ 0.8)")
    print(f"  CPU of the bridge process per Bulk-Only command (ms): {results.get('bridge_cpu_ms_per_command')}")
    vhci_us: dict[str, list[float]] = results["vhci_control_us"]  # type: ignore[assignment]
    bridge_us: dict[str, list[float]] = results["bridge_control_us"]  # type: ignore[assignment]
    print(f"control round trips through libusb, {results['iterations']} each (µs: p50 / p99)")
    ratios = {}
    for name, note in (("get_max_lun", "forwarded to the remote on both paths"),
                       ("get_descriptor_device", "bridge: answered by libcomposite locally")):
        v50, v99 = percentile(vhci_us[name], 50), percentile(vhci_us[name], 99)
        b50, b99 = percentile(bridge_us[name], 50), percentile(bridge_us[name], 99)
        ratios[name] = b99 / v99
        print(f"  {name:22s} vhci {v50:8.0f} / {v99:8.0f}   bridge {b50:8.0f} / {b99:8.0f}   "
              f"p99 ratio {b99 / v99:.2f}  ({note})")
    print(f"  control p99 ratio bridge ÷ vhci (GET_MAX_LUN): {ratios['get_max_lun']:.2f}  (target ≤ 2)")
    if "ffs_local_control_us" in results:
        floor: dict[str, list[float]] = results["ffs_local_control_us"]  # type: ignore[assignment]
        lun = floor["get_max_lun"]
        print(f"floor: the image served by vusb's Python model through FunctionFS locally (no USB/IP): read "
              f"{statistics.median(results['ffs_local_read_mb_s']):.1f} MB/s, GET_MAX_LUN "  # type: ignore[arg-type]
              f"{percentile(lun, 50):.0f} / {percentile(lun, 99):.0f} µs (an answer from a FunctionFS process "
              "waits for the UDC twice; libcomposite's own answers do not)")
    if "profile" in results:
        print(results["profile"])
    return read_ratio, ratios["get_max_lun"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--profile", action="store_true", help="profile the bridge process (cProfile, all threads)")
    parser.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--control-of", help=argparse.SUPPRESS)
    parser.add_argument("vusb_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.control_of is not None:
        print(json.dumps(measure_control(args.control_of, args.iterations)))
        return 0
    if args.profile_to is not None:
        return profile_attach(args.profile_to, args.vusb_args)
    if args.guest:
        print("VUSB-BENCH " + json.dumps(guest_main(args.size_mb, args.rounds, args.iterations, args.profile)))
        return 0
    from tools.vm import run_in_vm

    res = run_in_vm(
        [sys.executable, str(Path(__file__).resolve()), "--guest", "--size-mb", str(args.size_mb),
         "--rounds", str(args.rounds), "--iterations", str(args.iterations), *(["--profile"] if args.profile else [])],
        cwd=ROOT, timeout=1800, env={"PYTHONPATH": str(ROOT)},
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
