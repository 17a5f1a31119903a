"""Run one command inside a fresh QEMU guest of Debian's kernel and bring back its output and exit status.

The guest sees the whole host root read-only (so the host's Python, the project's venv and tools like `usbip`
just work), with tmpfs overlays on the directories it must write. A fresh host directory per run (the "share",
mounted writable at the same path inside the guest, `$VUSB_VM_IO`) carries the stage 2 script and the command
in, and stdout, stderr, exit status, boot time and dmesg out. No status file after QEMU exits means the guest
died: the error carries the console tail.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tools.vm.errors import VmBootError, VmError, VmTimeout
from tools.vm.initramfs import ensure_initramfs
from tools.vm.kernel import GuestKernel, cache_dir, load_prepared
from tools.vm.qemu import QemuConfig, choose_accel, command_line, qemu_binary

REPO = Path(__file__).resolve().parents[2]
# Directories the guest may write (tmpfs overlays over the read-only host copy); existing ones only.
DEFAULT_WRITABLE = ("/etc", "/home", "/mnt", "/opt", "/root", "/srv", "/tmp", "/usr", "/var")
CONSOLE_TAIL_LINES = 40

STAGE2_TEMPLATE = r"""#!/bin/sh
# vusb VM stage 2 (generated per run by tools/vm/runner.py): PID 1, chrooted into the host root.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
io=@IO@
say() { echo "vusb-vm: $*" > /dev/console; }
mkdir -p /lib/modules && ln -sfn @MODULES_DIR@ /lib/modules/@RELEASE@ || say "cannot link /lib/modules/@RELEASE@"
{ modprobe configfs && mount -t configfs configfs /sys/kernel/config; } || say "configfs unavailable"
ip link set lo up || say "cannot bring up lo"
echo vusb-vm > /proc/sys/kernel/hostname
read -r up _ < /proc/uptime
echo "$up" > "$io/boot-uptime"
say "running the command (uptime $up s)"
env -i @ENV@ /bin/sh "$io/command.sh" < /dev/null > "$io/stdout" 2> "$io/stderr"
rc=$?
read -r up _ < /proc/uptime
echo "$up" > "$io/end-uptime"
dmesg > "$io/dmesg" 2>&1
echo "$rc" > "$io/status.tmp" && mv "$io/status.tmp" "$io/status"
sync
echo o > /proc/sysrq-trigger
sleep 30
"""


@dataclass(frozen=True)
class VmResult:
    """What one guest run produced. `boot_seconds` is guest uptime when the command started."""

    returncode: int
    stdout: str
    stderr: str
    boot_seconds: float
    command_seconds: float
    wall_seconds: float
    console_log: str
    dmesg: str
    accel: str


def _venv_bin() -> Path | None:
    """The venv whose Python the guest should find first: the running one, else the repo's `.venv`."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "bin"
    candidate = REPO / ".venv" / "bin"
    return candidate if candidate.is_dir() else None


def guest_environment(io_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The command's whole environment in the guest (it does not inherit the host's, apart from PATH)."""
    path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    env = {
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "PYTHONDONTWRITEBYTECODE": "1",  # the host root is read-only in the guest
        "PYTHONUNBUFFERED": "1",
        "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/.hypothesis",
        "VUSB_IN_VM": "1",
        "VUSB_VM_IO": str(io_dir),
    }
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    venv = _venv_bin()
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv.parent)
        path = f"{venv}:{path}"
    env["PATH"] = path + ":/usr/sbin:/sbin"
    for key, value in (extra or {}).items():
        if not key.isidentifier():
            raise VmError(f"bad environment variable name {key!r}")
        env[key] = value
    return env


def writable_dirs(extra: Sequence[str | Path] = (), base: Sequence[str] = DEFAULT_WRITABLE) -> list[str]:
    """Absolute, existing, non-nested directories to overlay, parents before children."""
    chosen: list[str] = []
    for raw in sorted({*base, *(str(Path(p).resolve()) for p in extra)}):
        path = Path(raw)
        if path.is_symlink() or not path.is_dir():
            continue
        if any(raw == c or raw.startswith(c.rstrip("/") + "/") for c in chosen):
            continue
        chosen.append(raw)
    return chosen


def stage2_script(io_dir: Path, kernel: GuestKernel, env: Mapping[str, str]) -> str:
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    return (
        STAGE2_TEMPLATE.replace("@IO@", shlex.quote(str(io_dir)))
        .replace("@MODULES_DIR@", shlex.quote(str(kernel.modules_dir)))
        .replace("@RELEASE@", kernel.release)
        .replace("@ENV@", assignments)
    )


def command_script(cmd: str | Sequence[str], cwd: Path) -> str:
    """A string runs as shell code; a sequence runs as one argv (quoted for the shell)."""
    body = cmd if isinstance(cmd, str) else shlex.join(cmd)
    if not body.strip():
        raise VmError("no command to run in the guest")
    return f"cd {shlex.quote(str(cwd))} || exit 125\n{body}\n"


_ALERTS = ("Kernel panic", "BUG:", "Oops:", "vusb-vm: init failed", "Attempted to kill init")


def console_tail(text: str, lines: int = CONSOLE_TAIL_LINES) -> str:
    """The end of the console; if a panic/oops/init-failure line sits above that window, start from it
    (a panic's stack dump alone would push the reason out of view)."""
    all_lines = text.rstrip().splitlines()
    start = max(0, len(all_lines) - lines)
    alert = next((i for i, line in enumerate(all_lines) if any(a in line for a in _ALERTS)), None)
    if alert is not None and alert < start:
        start = max(alert, len(all_lines) - 3 * lines)
    return "\n".join(all_lines[start:])


def _tail(path: Path, lines: int = CONSOLE_TAIL_LINES) -> str:
    try:
        return console_tail(path.read_text(errors="replace"), lines)
    except OSError:
        return ""


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _float(path: Path) -> float:
    try:
        return float(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


class _Follower:
    """Forwards what the guest appends to its stdout/stderr files while it runs."""

    def __init__(self, io_dir: Path, sink: Callable[[str, str], None]) -> None:
        self._files = {"stdout": io_dir / "stdout", "stderr": io_dir / "stderr"}
        self._pos = dict.fromkeys(self._files, 0)
        self._sink = sink

    def poll(self) -> None:
        for stream, path in self._files.items():
            try:
                with path.open("rb") as f:
                    f.seek(self._pos[stream])
                    data = f.read()
            except FileNotFoundError:
                continue
            if data:
                self._pos[stream] += len(data)
                self._sink(stream, data.decode(errors="replace"))


def run_in_vm(
    cmd: str | Sequence[str],
    *,
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    mem_mb: int = 2048,
    smp: int | None = None,
    writable: Sequence[str | Path] = (),
    io_dir: str | Path | None = None,
    on_output: Callable[[str, str], None] | None = None,
) -> VmResult:
    """Boot a guest, run `cmd` in `cwd` (default: the current directory), power off, return what happened.

    `io_dir` (a host directory, kept afterwards) is the share; by default a temporary one is made and removed.
    `on_output(stream, text)` receives the command's output while it runs. The guest is killed after `timeout`
    seconds (boot included): `VmTimeout`. A guest that stops without an exit status: `VmBootError`.
    """
    started = time.monotonic()
    qemu = qemu_binary()
    kernel = load_prepared()
    initrd = ensure_initramfs(kernel)
    smp = smp or min(2, os.cpu_count() or 1)
    accel = choose_accel(qemu, smp, kernel.vmlinuz, initrd.path, cache_dir())
    workdir = Path(cwd).resolve() if cwd is not None else Path.cwd()
    own_io = io_dir is None
    share = Path(tempfile.mkdtemp(prefix="vusb-vm-")) if io_dir is None else Path(io_dir).resolve()
    if not share.is_dir():
        raise VmError(f"the share directory {share} does not exist")
    if (share / "status").exists():
        raise VmError(f"the share directory {share} holds a previous run's status: use a fresh one")
    try:
        cfg = QemuConfig(
            qemu=qemu,
            kernel=kernel.vmlinuz,
            initrd=initrd.path,
            io_dir=share,
            rw_dirs=writable_dirs([*writable, workdir]),
            accel=accel,
            mem_mb=mem_mb,
            smp=smp,
        )
        (share / "command.sh").write_text(command_script(cmd, workdir))
        (share / "stage2.sh").write_text(stage2_script(share, kernel, guest_environment(share, env)))
        return _boot(cfg, timeout, started, on_output)
    finally:
        if own_io:
            shutil.rmtree(share, ignore_errors=True)


def _boot(
    cfg: QemuConfig, timeout: float, started: float, on_output: Callable[[str, str], None] | None
) -> VmResult:
    share = cfg.io_dir
    follower = _Follower(share, on_output) if on_output else None
    with (share / "qemu.log").open("wb") as qemu_log:
        proc = subprocess.Popen(
            command_line(cfg),
            stdin=subprocess.DEVNULL,
            stdout=qemu_log,
            stderr=qemu_log,
            start_new_session=True,
        )
    deadline = started + timeout
    try:
        while proc.poll() is None:
            if follower:
                follower.poll()
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                boot = _float(share / "boot-uptime")
                stage = (
                    f"the command had been running since {boot:.1f} s after boot"
                    if boot == boot  # not NaN: stage 2 reached the command
                    else "it had not reached the command yet (still booting)"
                )
                raise VmTimeout(
                    f"the guest did not finish within {timeout:g} s and was killed; {stage}\n"
                    f"--- console tail ---\n{_tail(share / 'console.log')}",
                    console_tail=_tail(share / "console.log"),
                    stdout=_read(share / "stdout"),
                    stderr=_read(share / "stderr"),
                )
            time.sleep(0.1)
    finally:
        if proc.poll() is None:  # interrupted (KeyboardInterrupt): never leave a guest behind
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    if follower:
        follower.poll()
    status = share / "status"
    if not status.is_file():
        qemu_err = _read(share / "qemu.log").strip()
        console = _tail(share / "console.log")
        raise VmBootError(
            f"the guest stopped without an exit status (QEMU exit {proc.returncode})"
            + (f"\n--- QEMU ---\n{qemu_err[-2000:]}" if qemu_err else "")
            + f"\n--- console tail ---\n{console}",
            console_tail=console,
        )
    boot = _float(share / "boot-uptime")
    return VmResult(
        returncode=int(status.read_text().strip()),
        stdout=_read(share / "stdout"),
        stderr=_read(share / "stderr"),
        boot_seconds=boot,
        command_seconds=_float(share / "end-uptime") - boot,
        wall_seconds=time.monotonic() - started,
        console_log=_read(share / "console.log"),
        dmesg=_read(share / "dmesg"),
        accel=cfg.accel,
    )
