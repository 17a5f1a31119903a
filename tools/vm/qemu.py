"""The QEMU command line, and whether KVM may be used (only where a tiny guest actually runs under it)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tools.vm.errors import SETUP_HINT, VmError, VmNotPrepared
from tools.vm.initramfs import PROBE_MARKER

log = logging.getLogger("tools.vm")

QEMU = "qemu-system-x86_64"
# Kernel parameters: serial console, power off instead of rebooting on panic, quiet boot.
BASE_APPEND = ("console=ttyS0", "panic=-1", "quiet", "loglevel=4", "rdinit=/init")


def qemu_binary() -> str:
    """The QEMU executable (`$VUSB_QEMU` overrides), or `VmNotPrepared` naming the fix."""
    name = os.environ.get("VUSB_QEMU", QEMU)
    path = shutil.which(name)
    if path is None:
        raise VmNotPrepared(f"`{name}` not found (Debian package qemu-system-x86): {SETUP_HINT}")
    return path


# 64 KiB "BIOS" whose reset vector writes 1 to isa-debug-exit (port 0xf4): QEMU exits with status 3 when the
# vCPU ran at all. It is only the cheap first check: some hosts run real mode under KVM and then hang the guest
# kernel right after its real-mode setup (seen here: /dev/kvm present, a boot stuck at "Probing EDD").
_PROBE_CODE = b"\xb0\x01\xe6\xf4\xf4"  # mov al,1; out 0xf4,al; hlt
KERNEL_PROBE_TIMEOUT = 15.0  # a KVM boot to /probe takes ~1 s; TCG ~3 s


def _bios_probe(qemu: str, smp: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="vusb-kvm-probe-") as tmp:
        bios = Path(tmp) / "probe.bin"
        image = bytearray(b"\xf4" * 65536)
        image[0xFFF0 : 0xFFF0 + len(_PROBE_CODE)] = _PROBE_CODE
        bios.write_bytes(bytes(image))
        argv = [qemu, "-accel", "kvm", "-cpu", "host", "-smp", str(smp), "-m", "64", "-nodefaults",
                "-display", "none", "-no-reboot", "-bios", str(bios),
                "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]  # fmt: skip
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
        except subprocess.TimeoutExpired:
            return False
    return res.returncode == 3


def _kernel_probe(qemu: str, smp: int, kernel: Path, initrd: Path) -> bool:
    """Boot the real kernel under KVM to the initramfs's `/probe`, which prints a marker and powers off."""
    with tempfile.TemporaryDirectory(prefix="vusb-kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        argv = [qemu, "-accel", "kvm", "-cpu", "host", "-smp", str(smp), "-m", "256M", "-nodefaults",
                "-no-reboot", "-display", "none", "-serial", f"file:{console}", "-kernel", str(kernel),
                "-initrd", str(initrd), "-append", "console=ttyS0 panic=-1 quiet rdinit=/probe"]  # fmt: skip
        try:
            res = subprocess.run(argv, capture_output=True, timeout=KERNEL_PROBE_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            return False
        return res.returncode == 0 and PROBE_MARKER in console.read_text(errors="replace")


def kvm_works(qemu: str, smp: int, kernel: Path, initrd: Path, cache: Path) -> bool:
    """True when this kernel really boots under KVM here. Probed once per host/QEMU/kernel, then cached."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    st = os.stat(qemu)
    key = f"{os.uname().release}|{qemu}|{st.st_size}|{st.st_mtime_ns}|{kernel}|{initrd.stat().st_mtime_ns}|{smp}"
    verdict_file = cache / "accel.json"
    try:
        verdict = json.loads(verdict_file.read_text())
        if verdict.get("key") == key:
            return bool(verdict["kvm"])
    except (OSError, ValueError, KeyError):
        pass
    ok = _bios_probe(qemu, smp) and _kernel_probe(qemu, smp, kernel, initrd)
    if not ok:
        log.info("vm: /dev/kvm is present but a guest does not boot under KVM here: using TCG")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = verdict_file.with_name(f"accel.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "kvm": ok}) + "\n")
    tmp.replace(verdict_file)
    return ok


def choose_accel(qemu: str, smp: int, kernel: Path, initrd: Path, cache: Path) -> str:
    """`kvm` where it works, else `tcg`; `$VUSB_VM_ACCEL=tcg|kvm` forces one."""
    forced = os.environ.get("VUSB_VM_ACCEL", "").strip().lower()
    if forced in ("tcg", "kvm"):
        return forced
    if forced:
        raise VmError(f"VUSB_VM_ACCEL must be `tcg` or `kvm`, not {forced!r}")
    return "kvm" if kvm_works(qemu, smp, kernel, initrd, cache) else "tcg"


@dataclass(frozen=True)
class QemuConfig:
    """Everything that decides one guest's QEMU command line."""

    qemu: str
    kernel: Path
    initrd: Path
    io_dir: Path
    rw_dirs: Sequence[str]
    accel: str = "tcg"
    mem_mb: int = 2048
    smp: int = 2

    def __post_init__(self) -> None:
        if self.accel not in ("tcg", "kvm"):
            raise VmError(f"unknown accelerator {self.accel!r}")
        if self.mem_mb < 256:
            raise VmError(f"guest memory {self.mem_mb} MiB is too small (at least 256)")
        if self.smp < 1:
            raise VmError("the guest needs at least one vCPU")
        for path in (str(self.io_dir), *self.rw_dirs):
            if not path.startswith("/") or any(c in path for c in " ,\t\n\"'\\"):
                raise VmError(f"guest path {path!r} must be absolute, without spaces, commas or quotes")


def kernel_append(cfg: QemuConfig) -> str:
    return " ".join((*BASE_APPEND, f"vusb.io={cfg.io_dir}", f"vusb.rw={','.join(cfg.rw_dirs)}"))


def command_line(cfg: QemuConfig) -> list[str]:
    """The argv that boots the guest: the host root read-only and the share writable, both over virtio-9p."""
    cpu = "host" if cfg.accel == "kvm" else "max"
    return [
        cfg.qemu, "-accel", cfg.accel, "-cpu", cpu, "-smp", str(cfg.smp), "-m", f"{cfg.mem_mb}M",
        "-nodefaults", "-no-reboot", "-display", "none", "-no-user-config",
        "-serial", f"file:{cfg.io_dir / 'console.log'}",
        "-kernel", str(cfg.kernel), "-initrd", str(cfg.initrd),
        "-append", kernel_append(cfg),
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=io,path={cfg.io_dir},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=io,mount_tag=io",
    ]  # fmt: skip
