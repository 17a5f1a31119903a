"""`vusb serve` as a process: exports what the summary says, and Ctrl-C ends it cleanly with images synced."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from emulator.sync_host import list_devices_sync
from emulator.usb.setup import Speed

VUSB = [sys.executable, "-m", "emulator.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vusb serve exited early: {proc.stderr.read() if proc.stderr else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("vusb serve never listened")


def test_serve_creates_sparse_image_takes_writes_and_sigint_exits_zero_with_data_in_the_image(
    tmp_path: Path,
) -> None:
    image = tmp_path / "disk.img"
    port = _free_port()
    payload = os.urandom(3 << 20)
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    server = subprocess.Popen(
        [*VUSB, "serve", "--disk", str(image), "--size", "16M", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_listening(port, server)
        listing = subprocess.run(
            [*VUSB, "list", "-r", "127.0.0.1", "-p", str(port)], capture_output=True, text=True, timeout=60
        )
        assert listing.returncode == 0 and "1-1" in listing.stdout, listing.stderr
        (exported,) = list_devices_sync("127.0.0.1", port)
        assert exported.udev.speed == Speed.SUPER  # a USB 3 thumb drive by default
        write = subprocess.run(
            [*VUSB, "disk", "write", "-r", "127.0.0.1", "-p", str(port), "-b", "1-1", "-i", str(src)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert write.returncode == 0, write.stderr
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, err
    assert "Traceback" not in err
    assert image.stat().st_size == 16 << 20
    with image.open("rb") as f:
        assert hashlib.sha256(f.read(len(payload))).digest() == hashlib.sha256(payload).digest()


def test_serve_overlay_never_modifies_the_base_image(tmp_path: Path) -> None:
    image = tmp_path / "base.img"
    image.write_bytes(os.urandom(4 << 20))
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    src = tmp_path / "zeros.bin"
    src.write_bytes(bytes(1 << 20))
    port = _free_port()
    server = subprocess.Popen(
        [*VUSB, "serve", "--disk", str(image), "--overlay", "--speed", "high", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_listening(port, server)
        (exported,) = list_devices_sync("127.0.0.1", port)
        assert exported.udev.speed == Speed.HIGH
        write = subprocess.run(
            [
                *VUSB,
                "disk",
                "write",
                "-r",
                "127.0.0.1",
                "-p",
                str(port),
                "-b",
                "1-1",
                "-i",
                str(src),
                "--verify",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert write.returncode == 0, write.stderr
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
