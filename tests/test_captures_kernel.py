"""Real captures, made in the kernel VM: tcpdump (dumpcap) of `usbip attach` on lo, and usbmon of the vhci_hcd bus,
while Linux's usb-storage drives vusb's disk. Both views of the same URBs must pair into the same SCSI story, and
our dissection must agree with tshark's on them.

The captures are left in $VUSB_VM_IO/captures (the run directory under .vm/) for inspection; captures/samples/
holds trimmed copies (captures/samples/README.md).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_captures_tshark import _num, _pdml, _pdus

from captures.layers import read_packets
from captures.layers.usbip import USBIP_CmdSubmit, USBIP_RetSubmit, usbip_messages
from captures.transactions import Analysis, analyze
from emulator.usbip.constants import USBIP_PORT
from tools.vm import guest

pytestmark = pytest.mark.kernel

SET_ADDRESS = 5


@contextmanager
def dumpcap(interface: str, out: Path, capture_filter: str | None = None) -> Iterator[Path]:
    """A running dumpcap writing pcapng; stopped (SIGINT, so the file is complete) on exit."""
    argv = ["dumpcap", "-q", "-i", interface, "-w", str(out)]
    if capture_filter:
        argv += ["-f", capture_filter]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        guest.poll(
            lambda: (out.is_file() and out.stat().st_size > 0) or proc.poll() is not None or None,
            timeout=60,
            what=f"dumpcap on {interface} to start",
        )
        if proc.poll() is not None:
            raise AssertionError(
                f"dumpcap -i {interface} exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
            )
        yield out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _scsi_story(a: Analysis) -> list[tuple[object, ...]]:
    return [(c.tag, c.opcode, c.logical_block_address, c.blocks, c.data_transfer_length, c.csw_status, c.data_bytes)
            for c in a.scsi_commands]  # fmt: skip


def _device_setups(a: Analysis, busnum: int, devnums: tuple[int, ...]) -> list[bytes]:
    return [
        t.setup
        for t in a.transactions
        if t.setup is not None and t.busnum == busnum and t.devnum in devnums and t.setup[1] != SET_ADDRESS
    ]


def test_kernel_usbip_and_usbmon_captures_pair_into_the_same_scsi_commands_and_agree_with_tshark(
    tmp_path: Path,
) -> None:
    from emulator.devices.mass_storage import mass_storage_device
    from emulator.devices.storage import create_sparse_image
    from emulator.server import ServerThread

    guest.modprobe("usbmon", "vhci-hcd", "usb-storage", "sd_mod")
    image = create_sparse_image(tmp_path / "disk.img", 1 << 20)
    device = mass_storage_device([image], vendor="vusb", product="Capture")
    out = Path(os.environ.get("VUSB_VM_IO", tmp_path)) / "captures"
    out.mkdir(parents=True, exist_ok=True)
    usbip_file, usbmon_file = out / "usbip-attach.pcapng", out / "usbmon-vhci.pcapng"
    # The well-known port, so the capture reads like any `usbip attach` (tshark, `vusb dissect` need no --port).
    with ServerThread([device], port=USBIP_PORT) as server:
        port = server.port
        guest.wait_for_tcp("127.0.0.1", port)
        with dumpcap("lo", usbip_file, f"tcp port {port}"), dumpcap("usbmon0", usbmon_file):
            with guest.usbip_attached("127.0.0.1", "1-1", port=port):
                disk = guest.wait_for_disk("vhci_hcd", timeout=60)
                guest.run(
                    ["dd", f"if={disk.dev}", "of=/dev/null", "bs=4096", "count=2", "skip=16", "iflag=direct"]
                )
                guest.run(
                    ["dd", "if=/dev/zero", f"of={disk.dev}", "bs=4096", "count=1", "seek=32", "oflag=direct"]
                )
            guest.wait_for_disk_gone("vhci_hcd")

    over_ip = analyze(usbip_file, ports=(port,))
    on_bus = analyze(usbmon_file)
    assert over_ip.protocols == {"usbip"} and on_bus.protocols == {"usbmon"}
    assert over_ip.warnings == [], over_ip.warnings
    imports = [t for t in over_ip.transactions if t.kind == "import"]
    assert [(t.busid, t.status) for t in imports] == [("1-1", 0)]

    # The same URBs seen from both ends: the SCSI commands (tags, opcodes, LBAs, statuses, bytes) are identical.
    story = _scsi_story(over_ip)
    assert story == _scsi_story(on_bus)
    opcodes = {c[1] for c in story}
    assert {0x12, 0x25, 0x28, 0x2A} <= opcodes  # INQUIRY, READ CAPACITY(10), READ(10), WRITE(10)
    # dd's 8 KiB direct read at block 16 and 4 KiB write at block 32 (512-byte sectors), however the kernel splits them
    read = sum(
        c.data_bytes
        for c in over_ip.scsi_commands
        if c.opcode == 0x28 and 128 <= (c.logical_block_address or 0) < 144
    )
    written = sum(
        c.data_bytes for c in over_ip.scsi_commands if c.opcode == 0x2A and c.logical_block_address == 256
    )
    assert (read, written) == (8192, 4096)

    # Control requests to the device, as vhci sent them and as usbmon saw them: during enumeration the hub driver
    # talks to address 0, which vhci forwards to the imported device; SET_ADDRESS never leaves vhci.
    over = next(t for t in over_ip.transactions if t.kind == "submit")
    bus = next(t for t in on_bus.transactions if t.bot == "CBW")
    assert _device_setups(over_ip, over.busnum, (over.devnum,)) == _device_setups(
        on_bus, bus.busnum, (0, bus.devnum)
    )

    # What the kernel's vhci actually puts on the wire, and the scapy layers reading it.
    messages = [m for p in read_packets(usbip_file) if p.haslayer("TCP") for m in usbip_messages(p)]
    cmds = [m for m in messages if isinstance(m, USBIP_CmdSubmit)]
    rets = [m for m in messages if isinstance(m, USBIP_RetSubmit)]
    assert len(cmds) == len(rets) == sum(1 for t in over_ip.transactions if t.kind == "submit" and t.complete)
    assert {m.number_of_packets for m in cmds} <= {0, -1}

    # tshark on the real captures: pairing frames and SCSI annotations.
    if shutil.which("tshark"):
        theirs = _pdus(_pdml(usbip_file, "-d", f"tcp.port=={port},usbip"), "usbip")
        by_seqnum = {t.urb_id: t for t in over_ip.transactions if t.kind == "submit"}
        checked = 0
        for pdu in theirs:
            if "usbip.urb" in pdu.wire and _num(pdu.wire["usbip.urb"][0]) == 3:
                ours = by_seqnum[_num(pdu.wire["usbip.sequence_no"][0])]
                assert (ours.frame, ours.response_frame) == (
                    _num(pdu.generated["usbip.cmd_frame"][0]),
                    _num(pdu.generated["usbip.ret_frame"][0]),
                )
                checked += 1
        assert checked == len(rets)
        mon = _pdus(_pdml(usbmon_file), "usb")
        request_of = {t.response_frame: t.frame for t in on_bus.transactions}
        for pdu in mon:
            if "usb.request_in" in pdu.generated:
                assert request_of[pdu.frame] == _num(pdu.generated["usb.request_in"][0])
