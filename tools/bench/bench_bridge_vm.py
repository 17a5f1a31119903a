"""The gadget bridge against the kernel's vhci path, on kernel-exported disks, in one VM boot, interleaved.

The remotes are the kernel's: two configfs f_mass_storage gadgets on the same read-only 64 MiB image
(dummy_udc.0 and dummy_udc.1), both exported by usbip-host (`usbipd` + `usbip bind`). They are imported at
the same time, one each way:
  reference  `usbip attach` → vhci-hcd → usb-storage
  bridge     `vusb attach` (its own process) → a FunctionFS gadget on dummy_udc.2 → usb-storage
and measured in alternation, so whatever else loads the (shared, emulated) machine falls on both alike:
  * sequential read with O_DIRECT 1 MiB reads (like `dd bs=1M iflag=direct`), in 8 MiB turns, a round being
    the whole disk on both paths, each round checked against the image (sha256): the median of the
    per-round ratios bridge ÷ vhci (target ≥ 0.8);
  * control round trips through libusb (pyusb) on the local device nodes, usb-storage detached, one request
    on each path in turn: GET_MAX_LUN (a class request that travels to the remote device on both paths:
    the number that counts, p99 ratio bridge ÷ vhci, target ≤ 2) and GET_DESCRIPTOR(DEVICE) (on the bridge
    libcomposite answers it locally, on vhci it travels: shown for completeness).
With `--super-speed` dummy_hcd is loaded with is_super_speed=Y, so every link in the guest (both exported
disks, vhci's port and the bridge's gadget) runs at SuperSpeed and usb-storage sends 1 MiB commands on both
paths instead of 120 KiB ones. Then the floor under the bridge's local half: the same image served by vusb's
Python model through FunctionFS (`vusb emulate --gadget mass-storage`) on dummy_udc.2, with no USB/IP at all.

`--profile` runs the bridge under cProfile (every thread) and prints where its time went. `--timeline` reads
16 MiB more on each path alone with usbmon listening on all buses and prints, per 1 MiB command, when each
of its URBs was submitted and completed on the local bus and at the remote (usbip-host's dummy_hcd): where a
command's time goes, hop by hop, on both paths. Run from the repository root:
`.venv/bin/python tools/bench/bench_bridge_vm.py [--size-mb 64] [--rounds 3] [--iterations 1000] [--profile]
[--timeline] [--super-speed]` (or `vusb bench bridge-vm`).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
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

from tools.bench.common import cpu_times, emit, run_guest  # noqa: E402

CHUNK = 1 << 20
TURN = 8 << 20
BRIDGE_NAME = "vusb-bench-bridge"
US_BULK_GET_MAX_LUN = 0xFE
GET_DESCRIPTOR, DT_DEVICE = 0x06, 0x01
REQUESTS = {"get_max_lun": (0xA1, US_BULK_GET_MAX_LUN, 0, 0, 1),
            "get_descriptor_device": (0x80, GET_DESCRIPTOR, DT_DEVICE << 8, 0, 18)}


# --- measurements (guest side) ----------------------------------------------------------------------------


def read_interleaved(disks: dict[str, str], size: int, expected: str) -> dict[str, float]:
    """Read every disk whole with O_DIRECT 1 MiB reads, taking 8 MiB turns; MB/s per disk. Each one's bytes
    are hashed after the clocks stop and must match the image."""
    buffers = {name: mmap.mmap(-1, size) for name in disks}
    fds = {name: os.open(dev, os.O_RDONLY | os.O_DIRECT) for name, dev in disks.items()}
    spent = dict.fromkeys(disks, 0.0)
    try:
        for start in range(0, size, TURN):
            for name, fd in fds.items():
                view = memoryview(buffers[name])
                began = time.perf_counter()
                done = start
                while done < min(size, start + TURN):
                    n = os.preadv(fd, [view[done : done + CHUNK]], done)
                    if n <= 0:
                        raise RuntimeError(f"short read from {disks[name]} at {done}")
                    done += n
                spent[name] += time.perf_counter() - began
                view.release()
        for name, buf in buffers.items():
            digest = hashlib.sha256(buf).hexdigest()
            if digest != expected:
                raise RuntimeError(f"{disks[name]}: read back sha256 {digest} != image {expected}")
    finally:
        for fd in fds.values():
            os.close(fd)
        for buf in buffers.values():
            buf.close()
    return {name: round(size / seconds / 1e6, 2) for name, seconds in spent.items()}


def measure_control(sysfs_paths: dict[str, str], iterations: int) -> dict[str, dict[str, list[float]]]:
    """Round-trip times (µs) of each request on each device (one on each in turn), through libusb;
    usb-storage is detached from interface 0 first (an interface request needs it claimed)."""
    import usb.core
    import usb.util

    devices = {}
    for name, path in sysfs_paths.items():
        busnum, devnum = int(Path(path, "busnum").read_text()), int(Path(path, "devnum").read_text())
        dev = usb.core.find(bus=busnum, address=devnum)
        if dev is None:
            raise RuntimeError(f"libusb does not see bus {busnum} device {devnum}")
        if dev.is_kernel_driver_active(0):
            dev.detach_kernel_driver(0)
        usb.util.claim_interface(dev, 0)
        devices[name] = dev
    times: dict[str, dict[str, list[float]]] = {name: {r: [] for r in REQUESTS} for name in devices}
    try:
        for request, (request_type, code, value, index, length) in REQUESTS.items():
            for i in range(iterations + 20):
                for name, dev in devices.items():
                    start = time.perf_counter()
                    answer = dev.ctrl_transfer(request_type, code, value, index, length, timeout=5000)
                    elapsed = time.perf_counter() - start
                    if len(answer) != length:
                        raise RuntimeError(f"{request} on {name}: {len(answer)} bytes, not {length}")
                    if i >= 20:  # the first ones warm caches and pyusb's paths
                        times[name][request].append(round(elapsed * 1e6, 1))
    finally:
        for dev in devices.values():
            usb.util.release_interface(dev, 0)
            usb.util.dispose_resources(dev)
    return times


def control_in_subprocess(sysfs_paths: dict[str, str], iterations: int) -> dict[str, dict[str, list[float]]]:
    """`measure_control` in a fresh process: libusb (built for udev) learns of devices that appear later only
    through udevd, which the guest does not run, so a context made earlier would not see them."""
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--control-of", json.dumps(sysfs_paths),
                          "--iterations", str(iterations)], capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        raise RuntimeError(f"control measurement failed: {res.stderr[-2000:]}")
    times: dict[str, dict[str, list[float]]] = json.loads(res.stdout.strip().splitlines()[-1])
    return times


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


# Bulk-Only phases of a command, in µs from its CBW's submission on the local bus (usb-storage's URB).
PHASES = ("local CBW at device", "remote CBW submitted", "remote CBW done", "remote first data", "remote last data",
          "remote CSW", "local data done", "local CSW done", "next local CBW")
US_BULK_CB_WRAP_LEN, US_BULK_CS_WRAP_LEN = 31, 13


def bot_timeline(lines: list[str], local_bus: int, remote_bus: int, data_length: int = CHUNK) -> dict[str, float]:
    """Median time of each of `PHASES` over the Bulk-Only commands of `data_length` in a usbmon text trace
    (Documentation/usb/usbmon.rst: tag, timestamp µs, S/C, type:bus:dev:ep, status, length, ...). Commands
    missing an event (usbmon drops events when its reader falls behind) are left out of that phase."""
    commands: list[list[tuple[int, str, int, bool, int]]] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or not (fields[1].isdigit() and fields[5].isdigit()):
            continue
        kind, where = fields[2], fields[3].split(":")
        if len(where) < 4 or not where[1].isdigit() or where[0] not in ("Bi", "Bo"):
            continue
        event = (int(fields[1]), kind, int(where[1]), where[0] == "Bi", int(fields[5]))
        if event[2] == local_bus and kind == "S" and not event[3] and event[4] == US_BULK_CB_WRAP_LEN:
            commands.append([event])
        elif commands:
            commands[-1].append(event)
    samples: dict[str, list[int]] = {phase: [] for phase in PHASES}
    for command, following in itertools.pairwise(commands):
        if not any(bus == local_bus and kind == "S" and is_in and length == data_length
                   for _, kind, bus, is_in, length in command):
            continue
        found = {"local CBW at device": _times(command, local_bus, "C", False, "cbw")[:1],
                 "remote CBW submitted": _times(command, remote_bus, "S", False, "cbw")[:1],
                 "remote CBW done": _times(command, remote_bus, "C", False, "cbw")[:1],
                 "remote first data": _times(command, remote_bus, "C", True, "data")[:1],
                 "remote last data": _times(command, remote_bus, "C", True, "data")[-1:],
                 "remote CSW": _times(command, remote_bus, "C", True, "csw")[:1],
                 "local data done": _times(command, local_bus, "C", True, "data")[:1],
                 "local CSW done": _times(command, local_bus, "C", True, "csw")[:1],
                 "next local CBW": [following[0][0] - command[0][0]]}
        for phase, values in found.items():
            samples[phase].extend(values)
    return {phase: statistics.median(values) for phase, values in samples.items() if values}


def _times(command: list[tuple[int, str, int, bool, int]], bus: int, kind: str, is_in: bool, what: str) -> list[int]:
    """When `command`'s events of one kind happened, in µs after its first (the CBW's submission); `what`:
    "cbw", "csw" or "data" (any other non-empty length)."""
    start = command[0][0]
    return [t - start for t, k, b, i, n in command if b == bus and k == kind and i == is_in
            and (n == US_BULK_CS_WRAP_LEN if what == "csw" else n == US_BULK_CB_WRAP_LEN if what == "cbw"
                 else n not in (US_BULK_CS_WRAP_LEN, 0))]


def usbmon_timeline(disk: str, size: int, local_bus: int, remote_bus: int) -> dict[str, float]:
    """Read `disk` alone (O_DIRECT 1 MiB, into pages faulted in beforehand) while usbmon records all buses."""
    from tools.vm import guest

    debug = Path("/sys/kernel/debug")
    if not Path(debug, "usb").is_dir():
        subprocess.run(["mount", "-t", "debugfs", "none", str(debug)], capture_output=True, check=False)
    guest.modprobe("usbmon")
    buffer = mmap.mmap(-1, size)
    view = memoryview(buffer)
    for offset in range(0, size, mmap.PAGESIZE):
        view[offset] = 0
    trace = Path("/tmp/bench-bridge-usbmon.txt")
    fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)
    try:
        with trace.open("w") as out:
            reader = subprocess.Popen(["cat", str(debug / "usb/usbmon/0u")], stdout=out)
            time.sleep(0.5)
            try:
                for offset in range(0, size, CHUNK):
                    os.preadv(fd, [view[offset : offset + CHUNK]], offset)
                time.sleep(0.2)
            finally:
                reader.terminate()
                reader.wait()
    finally:
        os.close(fd)
        view.release()
        buffer.close()
    return bot_timeline(trace.read_text().splitlines(), local_bus, remote_bus)


# --- the paths (guest side) -------------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    return output


def guest_main(size_mb: int, rounds: int, iterations: int, profile: bool, super_speed: bool,
               timeline: bool = False) -> dict[str, object]:
    from tools.vm import guest

    size = size_mb << 20
    guest.modprobe("usb-storage", "sd_mod", "vhci-hcd")
    if super_speed:  # every dummy_hcd link at SuperSpeed: both disks, and so both paths, alike
        if guest.module_loaded("dummy_hcd"):
            guest.run(["modprobe", "-r", "dummy_hcd"])
        guest.modprobe("dummy_hcd", num=3, is_super_speed="Y")
    udc_vhci, udc_bridged, udc_local = guest.dummy_udcs(3)[:3]
    hcd_vhci, hcd_bridged, hcd_local = (guest.hcd_of_udc(u) for u in (udc_vhci, udc_bridged, udc_local))
    image = guest.make_backing_file(Path("/tmp/bench-bridge.img"), size)
    expected = guest.sha256_of(image)
    results: dict[str, object] = {"size_mb": size_mb, "rounds": rounds, "iterations": iterations,
                                  "speed": "super" if super_speed else "high"}

    def progress(key: str) -> None:  # on stderr as it comes, so a failure later still shows it
        print(f"[bench] {key}: {results[key]}", file=sys.stderr, flush=True)

    with guest.mass_storage_gadget(image, udc_vhci, read_only=True, name="vusb_ms_a", serial="benchvhci") as a, \
            guest.mass_storage_gadget(image, udc_bridged, read_only=True, name="vusb_ms_b", serial="benchbrdg") as b:
        dev_a = guest.wait_for_usb_device(a.vendor_id, a.product_id, under=hcd_vhci)
        dev_b = guest.wait_for_usb_device(b.vendor_id, b.product_id, under=hcd_bridged)
        with guest.usbipd() as daemon, guest.usbip_bound(dev_a.busid), guest.usbip_bound(dev_b.busid):
            argv = ["attach", "-r", "127.0.0.1", "-b", dev_b.busid, "--tcp-port", str(daemon.port),
                    "--udc", udc_local, "--name", BRIDGE_NAME]
            profile_path = Path("/tmp/bench-bridge.prof")
            command = [sys.executable, "-m", "emulator.cli", *argv]
            if profile:
                command = [sys.executable, str(Path(__file__).resolve()), "--profile-to", str(profile_path),
                           "--", *argv]
            with guest.usbip_attached("127.0.0.1", dev_a.busid, port=daemon.port):
                bridge = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                try:
                    disks = {"vhci": str(guest.wait_for_disk("vhci_hcd", timeout=60).dev),
                             "bridge": str(guest.wait_for_disk(hcd_local, timeout=120).dev)}
                    name = Path(disks["bridge"]).name
                    results["max_sectors_kb"] = int(Path(f"/sys/block/{name}/queue/max_sectors_kb").read_text())
                    vhci_name = Path(disks["vhci"]).name
                    results["vhci_max_sectors_kb"] = int(
                        Path(f"/sys/block/{vhci_name}/queue/max_sectors_kb").read_text())
                    before = cpu_times(bridge.pid)
                    results["read_mb_s"] = [read_interleaved(disks, size, expected) for _ in range(rounds)]
                    progress("read_mb_s")
                    user, system = (b - a for b, a in zip(cpu_times(bridge.pid), before, strict=True))
                    commands = rounds * size / (results["max_sectors_kb"] << 10)  # type: ignore[operator]
                    results["bridge_cpu_ms_per_command"] = {"user": round(user / commands * 1e3, 2),
                                                             "system": round(system / commands * 1e3, 2)}
                    (vhci_dev,) = guest.usb_devices("vhci_hcd")
                    (bridged_dev,) = guest.usb_devices(hcd_local)
                    if timeline:
                        def bus(device: guest.UsbDevice) -> int:
                            return int(Path(device.sysfs_path, "busnum").read_text())

                        results["timeline_us"] = {
                            "vhci": usbmon_timeline(disks["vhci"], 16 << 20, bus(vhci_dev), bus(dev_a)),
                            "bridge": usbmon_timeline(disks["bridge"], 16 << 20, bus(bridged_dev), bus(dev_b))}
                    results["control_us"] = control_in_subprocess(
                        {"vhci": vhci_dev.sysfs_path, "bridge": bridged_dev.sysfs_path}, iterations)
                finally:
                    output = _stop(bridge)
                if bridge.returncode != 0:
                    raise RuntimeError(f"vusb attach exited {bridge.returncode}: {output[-2000:]}")
                guest.wait_for_disk_gone(hcd_local)
            if profile:
                results["profile"] = profile_report(profile_path)

    model = subprocess.Popen([sys.executable, "-m", "emulator.cli", "emulate", "--gadget", "mass-storage", "--disk",
                              str(image), "--read-only", "--udc", udc_local, "--name", "vusb-bench-local"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        disk = guest.wait_for_disk(hcd_local, timeout=120)
        results["floor_read_mb_s"] = read_interleaved({"floor": str(disk.dev)}, size, expected)["floor"]
        (device,) = guest.usb_devices(hcd_local)
        results["floor_control_us"] = control_in_subprocess({"floor": device.sysfs_path}, iterations)["floor"]
    finally:
        _stop(model)
    return results


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
    rounds: list[dict[str, float]] = results["read_mb_s"]  # type: ignore[assignment]
    read_ratio = statistics.median(r["bridge"] / r["vhci"] for r in rounds)
    print(f"sequential read, {results['size_mb']} MiB x {results['rounds']} rounds in 8 MiB turns, O_DIRECT 1 MiB, "
          f"TCG guest, {results.get('speed', 'high')} speed (usb-storage max_sectors_kb bridge "
          f"{results.get('max_sectors_kb')}, vhci {results.get('vhci_max_sectors_kb')})")
    for path, label in (("vhci", "kernel usbip-host → vhci-hcd:          "),
                        ("bridge", "kernel usbip-host → vusb bridge gadget:")):
        speeds = [r[path] for r in rounds]
        print(f"  {label} {statistics.median(speeds):7.1f} MB/s  (rounds {speeds})")
    print(f"  ratio bridge ÷ vhci (median of the rounds' ratios): {read_ratio:.2f}  (target ≥ 0.8)")
    print(f"  CPU of the bridge process per Bulk-Only command (ms): {results.get('bridge_cpu_ms_per_command')}")
    control: dict[str, dict[str, list[float]]] = results["control_us"]  # type: ignore[assignment]
    print(f"control round trips through libusb, {results['iterations']} each, alternating (µs: p50 / p99)")
    ratios = {}
    for name, note in (("get_max_lun", "forwarded to the remote on both paths"),
                       ("get_descriptor_device", "bridge: answered by libcomposite locally")):
        v, b = control["vhci"][name], control["bridge"][name]
        ratios[name] = percentile(b, 99) / percentile(v, 99)
        print(f"  {name:22s} vhci {percentile(v, 50):7.0f} / {percentile(v, 99):7.0f}   bridge {percentile(b, 50):7.0f}"
              f" / {percentile(b, 99):7.0f}   p99 ratio {ratios[name]:.2f}  ({note})")
    print(f"  control p99 ratio bridge ÷ vhci (GET_MAX_LUN): {ratios['get_max_lun']:.2f}  (target ≤ 2)")
    floor: dict[str, list[float]] = results["floor_control_us"]  # type: ignore[assignment]
    lun = floor["get_max_lun"]
    print(f"floor: the image served by vusb's Python model through FunctionFS locally (no USB/IP, measured after): "
          f"read {results['floor_read_mb_s']:.1f} MB/s, GET_MAX_LUN {percentile(lun, 50):.0f} / "
          f"{percentile(lun, 99):.0f} µs")
    timeline: dict[str, dict[str, float]] | None = results.get("timeline_us")  # type: ignore[assignment]
    if timeline:
        print("one 1 MiB READ, each path read alone under usbmon (median µs from the CBW's submission on the local "
              "bus; 'remote' = at usbip-host's device):")
        print(f"  {'':22s} {'vhci':>8s} {'bridge':>8s}")
        for phase in PHASES:
            cells = [f"{timeline[path][phase]:8.0f}" if phase in timeline[path] else f"{'-':>8s}"
                     for path in ("vhci", "bridge")]
            print(f"  {phase:22s} {' '.join(cells)}")
    if "profile" in results:
        print(results["profile"])
    return read_ratio, ratios["get_max_lun"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--profile", action="store_true", help="profile the bridge process (cProfile, all threads)")
    parser.add_argument("--timeline", action="store_true",
                        help="read 16 MiB more on each path alone under usbmon: per-hop times of a 1 MiB command")
    parser.add_argument("--super-speed", action="store_true",
                        help="load dummy_hcd with is_super_speed=Y: both paths at SuperSpeed (1 MiB commands)")
    parser.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--control-of", help=argparse.SUPPRESS)
    parser.add_argument("vusb_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.control_of is not None:
        print(json.dumps(measure_control(json.loads(args.control_of), args.iterations)))
        return 0
    if args.profile_to is not None:
        return profile_attach(args.profile_to, args.vusb_args)
    if args.guest:
        emit(guest_main(args.size_mb, args.rounds, args.iterations, args.profile, args.super_speed,
                        args.timeline))
        return 0
    results = run_guest(Path(__file__).resolve(),
                        ["--size-mb", str(args.size_mb), "--rounds", str(args.rounds), "--iterations",
                         str(args.iterations), *(["--profile"] if args.profile else []),
                         *(["--super-speed"] if args.super_speed else []),
                         *(["--timeline"] if args.timeline else [])], timeout=1800)
    if results is None:
        return 1
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
