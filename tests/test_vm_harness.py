"""The VM harness's pure parts, checked without booting a guest (apt parsing, module order, QEMU argv, the
generated shell scripts, the initramfs archive, guest-output parsing, and the errors that name the fix)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.vm import guest
from tools.vm.errors import PrepareError, VmError, VmNotPrepared
from tools.vm.initramfs import (
    CpioNewc,
    build_image,
    init_script,
    is_static_elf,
    merge_orders,
    module_name,
    parse_show_depends,
)
from tools.vm.kernel import GuestKernel, parse_apt_depends, parse_apt_version
from tools.vm.pytest_plugin import GuestEcho, SuiteOutcome, parse_results
from tools.vm.qemu import QemuConfig, command_line, kernel_append
from tools.vm.runner import command_script, console_tail, guest_environment, stage2_script, writable_dirs

SHOW_DEPENDS_9P = """\
insmod /k/lib/modules/6.1.0-56-amd64/kernel/net/9p/9pnet.ko
insmod /k/lib/modules/6.1.0-56-amd64/kernel/fs/netfs/netfs.ko
insmod /k/lib/modules/6.1.0-56-amd64/kernel/fs/fscache/fscache.ko
insmod /k/lib/modules/6.1.0-56-amd64/kernel/fs/9p/9p.ko
"""


def test_parse_apt_depends_picks_the_versioned_image_package():
    text = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n  Recommends: firmware-linux\n"
    assert parse_apt_depends(text) == "linux-image-6.1.0-56-amd64"


def test_parse_apt_depends_without_an_image_dependency_is_a_clear_error():
    with pytest.raises(PrepareError, match="names no linux-image"):
        parse_apt_depends("linux-image-amd64\n  Depends: initramfs-tools\n")


def test_parse_apt_version_reads_the_version_field():
    assert parse_apt_version(
        "Package: linux-image-6.1.0-56-amd64\nVersion: 6.1.192-2\nArchitecture: amd64\n"
    ) == ("6.1.192-2")
    with pytest.raises(PrepareError):
        parse_apt_version("Package: x\n")


def test_show_depends_order_is_kept_and_builtins_are_skipped():
    paths = parse_show_depends("builtin crc32c\n" + SHOW_DEPENDS_9P)
    assert [module_name(p) for p in paths] == ["9pnet", "netfs", "fscache", "9p"]


def test_show_depends_garbage_line_is_rejected():
    with pytest.raises(PrepareError, match="unexpected"):
        parse_show_depends("modprobe: FATAL: Module nope not found\n")


def test_merged_module_orders_keep_each_modules_first_position():
    a = [Path("virtio_ring.ko"), Path("virtio.ko"), Path("virtio_pci.ko")]
    b = [Path("virtio_ring.ko"), Path("virtio.ko"), Path("9pnet.ko"), Path("9pnet_virtio.ko")]
    c = [Path("9pnet.ko"), Path("9p.ko")]
    merged = merge_orders([a, b, c])
    assert [p.stem for p in merged] == ["virtio_ring", "virtio", "virtio_pci", "9pnet", "9pnet_virtio", "9p"]


def test_module_name_strips_compression_and_ko_suffixes():
    assert module_name(Path("/x/virtio_ring.ko.xz")) == "virtio_ring"
    assert module_name(Path("/x/9p.ko")) == "9p"
    assert module_name(Path("/x/usb-storage.ko.zst")) == "usb-storage"


def _config(tmp_path: Path, **kw: object) -> QemuConfig:
    args: dict[str, object] = {
        "qemu": "/usr/bin/qemu-system-x86_64",
        "kernel": tmp_path / "vmlinuz",
        "initrd": tmp_path / "initrd.gz",
        "io_dir": tmp_path / "io",
        "rw_dirs": ["/etc", "/tmp"],
    }
    args.update(kw)
    return QemuConfig(**args)  # type: ignore[arg-type]


def test_qemu_command_line_uses_tcg_with_both_9p_shares_and_the_run_parameters(tmp_path):
    argv = command_line(_config(tmp_path, mem_mb=1024, smp=2))
    joined = " ".join(argv)
    assert argv[:5] == ["/usr/bin/qemu-system-x86_64", "-accel", "tcg", "-cpu", "max"]
    assert "-m 1024M" in joined and "-smp 2" in joined and "-no-reboot" in argv
    assert "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap" in argv
    assert f"local,id=io,path={tmp_path / 'io'},security_model=none,multidevs=remap" in argv
    assert f"file:{tmp_path / 'io' / 'console.log'}" in argv
    append = argv[argv.index("-append") + 1]
    assert append == kernel_append(_config(tmp_path))
    assert f"vusb.io={tmp_path / 'io'}" in append.split() and "vusb.rw=/etc,/tmp" in append.split()
    assert "panic=-1" in append.split() and "rdinit=/init" in append.split()


def test_qemu_command_line_with_kvm_uses_the_host_cpu(tmp_path):
    argv = command_line(_config(tmp_path, accel="kvm"))
    assert argv[1:5] == ["-accel", "kvm", "-cpu", "host"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("io_dir", Path("/tmp/with space"), "without spaces"),
        ("rw_dirs", ["/a,b"], "without spaces, commas"),
        ("rw_dirs", ["relative"], "must be absolute"),
        ("mem_mb", 64, "too small"),
        ("accel", "hvf", "unknown accelerator"),
    ],
)
def test_qemu_config_rejects_values_the_guest_cannot_take(tmp_path, field, value, message):
    with pytest.raises(VmError, match=message):
        _config(tmp_path, **{field: value})


def test_writable_dirs_keep_existing_outermost_directories_only(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    chosen = writable_dirs(
        [tmp_path / "a" / "b", tmp_path / "missing", tmp_path / "link"],
        base=(str(tmp_path / "a"), "/nonexistent"),
    )
    assert chosen == [str(tmp_path / "a")]


def test_writable_dirs_default_includes_tmp_and_the_given_work_dir(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    chosen = writable_dirs([repo])
    assert "/tmp" in chosen and "/etc" in chosen
    assert str(repo) in chosen or any(str(repo).startswith(c + "/") for c in chosen)


def test_command_script_keeps_each_argv_element_intact_through_the_shell(tmp_path):
    script = tmp_path / "command.sh"
    script.write_text(command_script(["printf", "<%s>\\n", "a b", "c'd", "$HOME", ""], tmp_path))
    out = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=True).stdout
    assert out == "<a b>\n<c'd>\n<$HOME>\n<>\n"


def test_command_script_runs_in_the_requested_directory_and_refuses_an_empty_command(tmp_path):
    script = tmp_path / "command.sh"
    script.write_text(command_script("pwd", tmp_path))
    assert subprocess.run(["sh", str(script)], capture_output=True, text=True).stdout.strip() == str(tmp_path)
    with pytest.raises(VmError, match="no command"):
        command_script("  ", tmp_path)


@pytest.mark.parametrize("shell", ["dash", "busybox"])
def test_generated_init_and_stage2_scripts_parse_in_the_shells_that_run_them(tmp_path, shell):
    if shutil.which(shell) is None:
        pytest.fail(f"{shell} is not installed (bash tools/setup.sh installs busybox-static)")
    kernel = GuestKernel("linux-image-x", "1", "6.1.0-x-amd64", tmp_path / "k")
    env = guest_environment(tmp_path, {"A": 'it\'s "quoted" $x'})
    for name, text in (
        ("init", init_script(["virtio_ring", "9p"])),
        ("stage2", stage2_script(tmp_path, kernel, env)),
    ):
        path = tmp_path / name
        path.write_text(text)
        argv = [shell, "sh", "-n", str(path)] if shell == "busybox" else [shell, "-n", str(path)]
        res = subprocess.run(argv, capture_output=True, text=True)
        assert res.returncode == 0, f"{name}: {res.stderr}"


def test_guest_environment_puts_the_venv_first_and_marks_the_guest(tmp_path):
    env = guest_environment(tmp_path, {"EXTRA": "1"})
    assert env["VUSB_IN_VM"] == "1" and env["VUSB_VM_IO"] == str(tmp_path)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["EXTRA"] == "1"
    assert env["PATH"].split(":")[0] == str(Path(sys.prefix) / "bin")
    with pytest.raises(VmError, match="bad environment variable name"):
        guest_environment(tmp_path, {"NOT VALID": "x"})


def test_initramfs_archive_unpacks_with_cpio_to_init_modules_busybox_and_device_nodes(tmp_path):
    mods = []
    for name in ("virtio_ring", "9p"):
        p = tmp_path / f"{name}.ko"
        p.write_bytes(name.encode() * 3)
        mods.append(p)
    image = build_image(mods, b"\x7fELF-fake-busybox")
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=image, capture_output=True, check=True).stdout
    names = listing.decode().split()
    for expected in (
        "init",
        "probe",
        "bin/busybox",
        "bin/sh",
        "modules/virtio_ring.ko",
        "modules/9p.ko",
        "dev/console",
    ):
        assert expected in names
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames"], input=image, cwd=out, check=True)
    assert (out / "modules" / "9p.ko").read_bytes() == b"9p9p9p"
    assert (out / "bin" / "sh").is_symlink() and (out / "bin" / "sh").readlink() == Path("busybox")
    assert "for m in virtio_ring 9p; do" in (out / "init").read_text()


def test_cpio_writer_pads_every_entry_to_four_bytes():
    cpio = CpioNewc()
    cpio.file("abc", b"12345")
    data = cpio.finish()
    assert len(data) % 4 == 0 and data.startswith(b"070701")


def test_static_busybox_is_recognised_and_a_dynamic_binary_is_not():
    assert is_static_elf(Path("/bin/busybox").read_bytes())
    assert not is_static_elf(Path(sys.executable).resolve().read_bytes())
    assert not is_static_elf(b"#!/bin/sh\n")


def test_guest_results_are_folded_and_a_torn_last_line_is_ignored():
    outcome = SuiteOutcome()
    lines = [
        '{"start": "t.py::a"}',
        '{"report": {"nodeid": "t.py::a", "when": "setup"}}',
        '{"report": {"nodeid": "t.py::a", "when": "call"}}',
        '{"collect_error": "t2.py", "text": "ImportError"}',
        '{"start": "t.py::b"}',
        '{"report": {"nodeid": "t.py::b", "wh',
    ]
    parse_results(lines, outcome)
    assert [r["when"] for r in outcome.reports["t.py::a"]] == ["setup", "call"]
    assert outcome.started == ["t.py::a", "t.py::b"] and "t.py::b" not in outcome.reports
    assert outcome.collect_errors == ["t2.py:\nImportError"] and outcome.finished is None


def test_usbip_port_output_maps_vhci_ports_to_remote_devices():
    out = """Imported USB devices
====================
Port 00: <Port in Use> at High Speed(480Mbps)
       Linux Foundation : Multifunction Composite Gadget (1d6b:0104)
       2-1 -> usbip://127.0.0.1:3240/1-1
           -> remote bus/dev 001/002
Port 08: <Port in Use> at Super Speed(5000Mbps)
       unknown vendor : unknown product (1234:5678)
       3-1 -> usbip://127.0.0.1:3241/2-1
           -> remote bus/dev 002/002
"""
    assert guest.parse_usbip_port(out) == {0: "127.0.0.1:3240/1-1", 8: "127.0.0.1:3241/2-1"}
    assert guest.parse_usbip_port("Imported USB devices\n====================\n") == {}


def test_poll_returns_a_falsy_but_real_value_and_times_out_with_what_it_waited_for():
    assert guest.poll(lambda: 0, timeout=1, what="zero") == 0
    with pytest.raises(guest.GuestError, match=r"timed out after 0.2 s waiting for the moon"):
        guest.poll(lambda: None, timeout=0.2, what="the moon")


def test_missing_guest_kernel_is_an_error_that_names_the_setup_script(tmp_path, monkeypatch):
    from tools.vm import run_in_vm

    monkeypatch.setenv("VUSB_CACHE", str(tmp_path))
    with pytest.raises(VmNotPrepared, match=r"bash tools/setup\.sh"):
        run_in_vm("true")


def test_missing_qemu_is_an_error_that_names_the_setup_script(monkeypatch):
    from tools.vm import run_in_vm

    monkeypatch.setenv("VUSB_QEMU", "/nonexistent/qemu-system-x86_64")
    with pytest.raises(VmNotPrepared, match=r"not found .*bash tools/setup\.sh"):
        run_in_vm("true")


def test_cli_run_without_a_command_exits_2_with_usage():
    res = subprocess.run(
        [sys.executable, "-m", "tools.vm", "run", "--"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert res.returncode == 2
    assert "no command given" in res.stderr


def test_console_tail_keeps_the_panic_reason_above_a_long_stack_dump():
    text = "\n".join(["boot"] * 50 + ["Kernel panic - not syncing: sysrq triggered crash"] + ["trace"] * 60)
    tail = console_tail(text, lines=40)
    assert tail.splitlines()[0].startswith("Kernel panic") and len(tail.splitlines()) == 61
    assert console_tail("a\nb\nc", lines=2) == "b\nc"


def test_guest_echo_prints_whole_lines_and_skips_the_guests_failure_sections():
    out: list[str] = []
    echo = GuestEcho(out.append)
    echo("stdout", "t.py::a PASS")
    echo("stdout", "ED\nt.py::b FAILED\n")
    echo("stdout", "=========== FAILURES ===========\n___ b ___\nassert 0\n")
    echo("stderr", "guest stderr line\n")
    echo("stdout", "==== short test summary info ====\nFAILED t.py::b\n")
    assert out == [
        "[vm] t.py::a PASSED",
        "[vm] t.py::b FAILED",
        "[vm] (failure details follow in this run's own FAILURES section)",
        "[vm] guest stderr line",
        "[vm] ==== short test summary info ====",
        "[vm] FAILED t.py::b",
    ]
