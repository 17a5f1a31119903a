"""What several benchmarks share: a process's CPU time, the PyPI `usbip` server they compare against, and
running a benchmark's guest half in the kernel VM."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

_MARK = "VUSB-BENCH "


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU time process `pid` has used so far, all its threads, ended ones included
    (/proc/PID/stat, in clock ticks: 10 ms)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """`cpu_times`, user + system."""
    return sum(cpu_times(pid))


# The PyPI package (0.7.0, the `bench` extra) exporting IMAGE as a read-only high-speed disk on 127.0.0.1,
# run as `python -c PYPI_SERVER IMAGE [PORT]`; it prints the port (a free one when none is given: the package
# binds a fixed port). Its MSC class takes any object with block_size, num_blocks, read(lba, count) and
# write(lba, count, data); this one preads the image, as vusb's ImageStore does.
PYPI_SERVER = """
import os, socket, sys, threading
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

if len(sys.argv) > 2:
    port = int(sys.argv[2])
else:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
device = USBDevice(0x1209, 0x0004, product="PyPI usbip disk", serial="0123456789AB")
device.set_speed(core.SPEED_HIGH)
device.add(MSC(ImageFile(sys.argv[1]), read_only=True))
device.plug(via=USBIP("127.0.0.1", port))
print(port, flush=True)
threading.Event().wait()
"""


def emit(result: dict[str, Any]) -> None:
    """The guest half's result, for `run_guest` to find in the guest's output."""
    print(_MARK + json.dumps(result), flush=True)


def run_guest(script: Path, args: list[str], *, timeout: float) -> dict[str, Any] | None:
    """Run `script --guest ARGS` in one boot of the kernel VM and return what it `emit`ted; None, with the
    guest's output on stderr, when it failed."""
    from tools.vm import run_in_vm

    root = Path(__file__).resolve().parents[2]
    res = run_in_vm([sys.executable, str(script), "--guest", *args], cwd=root, timeout=timeout,
                    env={"PYTHONPATH": str(root)})
    line = next((x for x in res.stdout.splitlines() if x.startswith(_MARK)), None)
    if res.returncode != 0 or line is None:
        print(res.stdout[-3000:], res.stderr[-3000:], sep="\n", file=sys.stderr)
        print(f"benchmark failed in the guest (exit {res.returncode})", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(line.removeprefix(_MARK))
    return result
