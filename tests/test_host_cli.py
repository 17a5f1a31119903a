"""`vusb list / info / disk dump|write / demo` through click's CliRunner, against vusb's server on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from emulator import cli_host
from emulator.cli import cli
from emulator.cli_host import build_demo_image
from emulator.devices.hid import hid_keyboard_device
from emulator.devices.mass_storage import mass_storage_device
from emulator.devices.storage import create_sparse_image
from tests.host_helpers import server_process, server_thread

MIB = 1 << 20


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def disk_image(tmp_path: Path) -> Path:
    image = create_sparse_image(tmp_path / "disk.img", 4 * MIB)
    with image.open("r+b") as f:
        f.write(os.urandom(4 * MIB))
    return image


def test_list_shows_every_exported_device() -> None:
    with server_thread([hid_keyboard_device(), mass_storage_device(None)]) as running:
        result = invoke("list", "-r", "127.0.0.1", "-p", str(running.port))
    assert result.exit_code == 0, result.output
    assert "1-1" in result.output and "1209:0001" in result.output
    assert "1-2" in result.output and "1209:0004" in result.output and "Mass Storage" in result.output


def test_info_prints_the_descriptor_tree_read_from_the_device() -> None:
    with server_thread([hid_keyboard_device()]) as running:
        result = invoke("info", "-r", "127.0.0.1", "-p", str(running.port), "-b", "1-1")
    assert result.exit_code == 0, result.output
    for expected in ("1209:0001", "vusb keyboard", "DeviceDescriptor", "ConfigurationDescriptor",
                     "interface 0 alt 0: HID", "HidDescriptor", "endpoint 0x81 interrupt IN", "vusb-kbd-0001"):
        assert expected in result.output, expected


def test_unknown_busid_is_one_line_and_exit_status_1() -> None:
    with server_thread([hid_keyboard_device()]) as running:
        result = invoke("info", "-r", "127.0.0.1", "-p", str(running.port), "-b", "9-9")
    assert result.exit_code == 1
    assert "ST_NODEV" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_unreachable_server_is_one_line_and_exit_status_1() -> None:
    with server_thread([]) as running:
        port = running.port
    result = invoke("list", "-r", "127.0.0.1", "-p", str(port), "--timeout", "2")
    assert result.exit_code == 1
    assert f"cannot connect to 127.0.0.1:{port}" in result.output and "Traceback" not in result.output


def test_disk_dump_with_verify_writes_a_copy_of_the_image(disk_image: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "dump.img"
    output.parent.mkdir()
    with server_thread([mass_storage_device(str(disk_image))]) as running:
        result = invoke("disk", "dump", "-r", "127.0.0.1", "-p", str(running.port), "-b", "1-1", "-o",
                        str(output), "--verify")
    assert result.exit_code == 0, result.output
    assert output.read_bytes() == disk_image.read_bytes()
    assert "verified" in result.output and "MiB/s" in result.output
    assert os.listdir(output.parent) == ["dump.img"]  # no temporary file left


def test_disk_write_with_verify_puts_the_file_at_the_start_of_the_disk(disk_image: Path, tmp_path: Path) -> None:
    before = disk_image.read_bytes()
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(MIB + 100))  # ends inside a block
    with server_thread([mass_storage_device(str(disk_image))]) as running:
        result = invoke("disk", "write", "-r", "127.0.0.1", "-p", str(running.port), "-b", "1-1", "-i",
                        str(source), "--verify", "--urbs", "2")
    assert result.exit_code == 0, result.output
    after = disk_image.read_bytes()
    assert after[:MIB + 100] == source.read_bytes()
    assert after[MIB + 100:] == before[MIB + 100:]  # the rest of the last block kept its old bytes
    assert "sha256 matches" in result.output


def test_disk_write_of_a_file_larger_than_the_disk_is_refused(disk_image: Path, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(bytes(5 * MIB))
    before = disk_image.read_bytes()
    with server_thread([mass_storage_device(str(disk_image))]) as running:
        result = invoke("disk", "write", "-r", "127.0.0.1", "-p", str(running.port), "-b", "1-1", "-i",
                        str(source))
    assert result.exit_code == 1 and "larger than the disk" in result.output
    assert disk_image.read_bytes() == before


def test_dump_interrupted_by_a_dying_server_leaves_no_partial_file(tmp_path: Path) -> None:
    image = create_sparse_image(tmp_path / "big.img", 256 * MIB)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "dump.img"
    with server_process(image) as (process, port):
        results: list[Result] = []
        worker = threading.Thread(target=lambda: results.append(invoke(
            "disk", "dump", "-r", "127.0.0.1", "-p", str(port), "-b", "1-1", "-o", str(output))))
        worker.start()
        deadline = time.monotonic() + 20
        while not any(p.stat().st_size > 0 for p in out_dir.glob(".dump.img.*.partial")):
            assert time.monotonic() < deadline and worker.is_alive(), "the dump never started writing"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        worker.join(30)
    assert not worker.is_alive()
    (result,) = results
    assert result.exit_code == 1
    assert "was not written (partial data deleted)" in result.output
    assert list(out_dir.iterdir()) == []


def test_demo_round_trips_an_image_and_exits_0() -> None:
    start = time.monotonic()
    result = invoke("demo")
    assert result.exit_code == 0, result.output
    assert "OK: the image read back is identical" in result.output
    assert "INQUIRY:" in result.output and "capacity:" in result.output and "MiB/s" in result.output
    assert time.monotonic() - start < 20


def test_demo_image_is_a_fat_file_system_when_mtools_are_installed(tmp_path: Path) -> None:
    if not (shutil.which("mkfs.vfat") and shutil.which("mcopy")):
        pytest.skip("dosfstools/mtools not installed")
    image, how = build_demo_image(tmp_path, 4 * MIB)
    assert how.startswith("a FAT file system")
    boot = image.read_bytes()[:512]
    assert boot[510:512] == b"\x55\xaa" and b"VUSBDEMO" in boot


def test_demo_image_falls_back_to_a_generated_one_without_mtools(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_host.shutil, "which", lambda name: None)
    image, how = build_demo_image(tmp_path, 2 * MIB)
    assert "not installed" in how and "generated image" in how
    assert image.stat().st_size == 2 * MIB and image.read_bytes().startswith(b"VUSB DEMO IMAGE")


def test_demo_exits_1_when_the_image_read_back_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    real_read_to = cli_host.read_to

    async def corrupting_read_to(*args, **kwargs):  # type: ignore[no-untyped-def]
        _, seconds = await real_read_to(*args, **kwargs)
        return "0" * 64, seconds

    monkeypatch.setattr(cli_host, "read_to", corrupting_read_to)
    result = invoke("demo", "--size", "2")
    assert result.exit_code == 1 and "sha256 mismatch" in result.output
