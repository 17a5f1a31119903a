"""The `vusb` console script as a user meets it: version, help, and mistakes as one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from emulator import __version__

VUSB = [sys.executable, "-m", "emulator.cli"]


def vusb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VUSB, *args], capture_output=True, text=True, timeout=60)


def test_version_prints_the_package_version() -> None:
    res = vusb("--version")
    assert res.returncode == 0
    assert __version__ in res.stdout


def test_help_lists_the_main_commands() -> None:
    res = vusb("--help")
    assert res.returncode == 0
    for command in ("serve", "list", "info", "disk", "demo", "dissect"):
        assert command in res.stdout


@pytest.mark.parametrize(
    ("args", "needle", "code"),
    [
        (("nosuch",), "No such command", 2),
        (("serve", "--port", "abc"), "--port", 2),
        (("serve",), "nothing to export", 2),
        (("serve", "--disk", "/nonexistent/dir/x.img"), "/nonexistent/dir/x.img", 1),
        (("list", "-r", "127.0.0.1", "--port", "1"), "127.0.0.1", 1),
        (("attach", "--vhci", "--record", "x.pcapng", "-r", "127.0.0.1", "-b", "1-1"), "--record needs", 2),
        (("serve", "--disk", "x.img", "--speed", "low"), "--speed", 2),
    ],
)
def test_user_mistakes_are_one_line_on_stderr_without_traceback(
    args: tuple[str, ...], needle: str, code: int
) -> None:
    res = vusb(*args)
    assert res.returncode == code, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("vusb: error:") and needle in lines[0]
    assert "Traceback" not in res.stderr


def test_serve_refuses_read_only_with_overlay(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    res = vusb("serve", "--disk", str(image), "--read-only", "--overlay")
    assert res.returncode == 2 and "exclude each other" in res.stderr
