"""One mass-storage conversation, at URB level, written out as USB/IP over TCP and as usbmon records.

Shared by the tshark comparison tests and the CLI tests: the same URBs (enumeration, class requests, BOT commands
with data in both directions, a failed command, a stall) in both transports, so one script exercises both
dissectors. Every byte comes from the spec layouts here or from the core codec (`emulator.usbip.pack`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from captures import synth
from captures.reader import LINKTYPE_ETHERNET, LINKTYPE_USB_LINUX, LINKTYPE_USB_LINUX_MMAPPED
from emulator.usbip import CmdSubmit, OpRepImport, OpReqImport, RetSubmit, UsbDevice, pack

DEVID = 0x00010002  # bus 1, device 2
MSS = 1448


@dataclass(frozen=True)
class Urb:
    endpoint: int  # address, 0x80 for IN
    length: int  # transfer_buffer_length
    setup: bytes | None = None
    out_data: bytes = b""
    in_data: bytes = b""
    status: int = 0
    together: bool = False  # submitted together with the next URB (one TCP segment / back-to-back records)


def cbw(tag: int, length: int, cdb: bytes, data_in: bool) -> bytes:
    return (
        struct.pack("<IIIBBB", 0x43425355, tag, length, 0x80 if data_in else 0, 0, len(cdb))
        + cdb
        + bytes(16 - len(cdb))
    )


def csw(tag: int, status: int = 0, residue: int = 0) -> bytes:
    return struct.pack("<IIIB", 0x53425355, tag, residue, status)


DEVICE_DESCRIPTOR = bytes.fromhex("12 01 0002 00 00 00 40 6b1d 0401 0001 01 02 03 01")
CONFIG_DESCRIPTOR = bytes.fromhex(
    "09 02 2000 01 01 00 80 32  09 04 00 00 02 08 06 50 00  07 05 81 02 0002 00  07 05 02 02 0002 00"
)
INQUIRY_DATA = bytes.fromhex("00 80 06 02 1f 00 00 00") + b"vusb    " + b"Virtual Disk    " + b"1.0 "
SENSE_DATA = bytes.fromhex("70 00 05 00000000 0a 00000000 24 00 00 000000")
READ_DATA = bytes(range(256)) * 16
WRITE_DATA = bytes(reversed(range(256))) * 2


def mass_storage_urbs() -> list[Urb]:
    return [
        Urb(0x80, 18, setup=bytes.fromhex("8006000100001200"), in_data=DEVICE_DESCRIPTOR),
        Urb(0x80, 255, setup=bytes.fromhex("800600020000ff00"), in_data=CONFIG_DESCRIPTOR),
        Urb(0x00, 0, setup=bytes.fromhex("0009010000000000")),
        Urb(0x80, 1, setup=bytes.fromhex("a1fe000000000100"), in_data=b"\x00"),
        Urb(0x02, 31, out_data=cbw(1, 36, bytes.fromhex("12 00 00 0024 00"), True)),
        Urb(0x81, 36, in_data=INQUIRY_DATA, together=True),
        Urb(0x81, 13, in_data=csw(1)),
        Urb(0x02, 31, out_data=cbw(2, 8, bytes.fromhex("25 00 00000000 0000 00 00"), True)),
        Urb(0x81, 8, in_data=struct.pack(">II", 0x3FFF, 512)),
        Urb(0x81, 13, in_data=csw(2)),
        Urb(0x02, 31, out_data=cbw(3, 4096, bytes.fromhex("28 00 00000010 00 0008 00"), True)),
        Urb(0x81, 4096, in_data=READ_DATA),
        Urb(0x81, 13, in_data=csw(3)),
        Urb(0x02, 31, out_data=cbw(4, 0, bytes.fromhex("00 00000000 00"), False)),
        Urb(0x81, 13, in_data=csw(4, status=1)),
        Urb(0x02, 31, out_data=cbw(5, 18, bytes.fromhex("03 00 0000 12 00"), True)),
        Urb(0x81, 18, in_data=SENSE_DATA),
        Urb(0x81, 13, in_data=csw(5)),
        Urb(0x02, 31, out_data=cbw(6, 512, bytes.fromhex("2a 00 00000020 00 0001 00"), False)),
        Urb(0x02, 512, out_data=WRITE_DATA),
        Urb(0x81, 13, in_data=csw(6)),
        Urb(0x81, 13, status=-32),  # a stalled bulk IN (last: tshark 4.0 swallows a failed RET's segment)
    ]


UDEV = UsbDevice(path="/sys/devices/pci0000:00/0000:00:1d.0/usb1/1-1", busid="1-1", busnum=1, devnum=2, speed=3,
                 idVendor=0x1D6B, idProduct=0x0104, bcdDevice=0x0100, bNumInterfaces=1)  # fmt: skip


def usbip_capture(
    urbs: list[Urb], *, import_first: bool = True, coalesce_rets: bool = False, start: float = 1_700_000_000.0
) -> bytes:
    """The URBs as USB/IP over TCP: the CMD_SUBMITs of `together` URBs share a segment (their RET_SUBMITs too
    with `coalesce_rets`), segments are cut at the MSS, as a kernel's TCP would do it."""
    conn = synth.TcpConnection()
    frames: list[synth.Frame] = []
    ts = start

    def emit(to_server: bool, payload: bytes) -> None:
        nonlocal ts
        for f in conn.send(to_server, payload, list(range(MSS, len(payload), MSS))):
            ts += 0.0001
            frames.append((ts, f))

    for f in conn.handshake():
        ts += 0.0001
        frames.append((ts, f))
    if import_first:
        emit(True, pack(OpReqImport(busid="1-1")))
        emit(False, pack(OpRepImport(udev=UDEV)))
    i = 0
    seqnum = 0
    while i < len(urbs):
        group = [urbs[i]]
        while group[-1].together and i + 1 < len(urbs):
            i += 1
            group.append(urbs[i])
        i += 1
        cmds, rets = b"", []
        for urb in group:
            seqnum += 1
            direction = 1 if urb.endpoint & 0x80 else 0
            cmds += pack(CmdSubmit(seqnum=seqnum, devid=DEVID, direction=direction, ep=urb.endpoint & 0x0F,
                                   transfer_buffer_length=urb.length, setup=urb.setup or bytes(8),
                                   transfer_buffer=urb.out_data))  # fmt: skip
            actual = len(urb.in_data) if direction else len(urb.out_data)
            if urb.status:
                actual = 0
            rets.append(
                pack(
                    RetSubmit(
                        seqnum=seqnum, status=urb.status, actual_length=actual, transfer_buffer=urb.in_data
                    )
                )
            )
        emit(True, cmds)
        for ret in [b"".join(rets)] if coalesce_rets else rets:
            emit(False, ret)
    return synth.pcap(frames, LINKTYPE_ETHERNET)


XFER = {0: synth.XFER_CONTROL}


def usbmon_capture(urbs: list[Urb], *, mmapped: bool, start: float = 1_700_000_000.0) -> bytes:
    """The URBs as usbmon records: 'S' (setup, OUT data) then 'C' (IN data), interleaved for `together` URBs."""
    frames: list[synth.Frame] = []
    ts = start

    def rec(**kw: object) -> None:
        nonlocal ts
        ts += 0.0001
        frames.append((ts, synth.usbmon_record(busnum=1, devnum=2, ts=ts, mmapped=mmapped, **kw)))  # type: ignore[arg-type]

    i = 0
    while i < len(urbs):
        group = [(i, urbs[i])]
        while group[-1][1].together and i + 1 < len(urbs):
            i += 1
            group.append((i, urbs[i]))
        i += 1
        for n, urb in group:
            xfer = synth.XFER_CONTROL if urb.endpoint & 0x0F == 0 else synth.XFER_BULK
            rec(urb_id=0xFFFF888000001000 + n * 0x40, event="S", xfer_type=xfer, epnum=urb.endpoint, length=urb.length,
                setup=urb.setup, data=urb.out_data, status=-115)  # fmt: skip
        for n, urb in group:
            xfer = synth.XFER_CONTROL if urb.endpoint & 0x0F == 0 else synth.XFER_BULK
            actual = 0 if urb.status else (len(urb.in_data) if urb.endpoint & 0x80 else len(urb.out_data))
            rec(urb_id=0xFFFF888000001000 + n * 0x40, event="C", xfer_type=xfer, epnum=urb.endpoint, length=actual,
                data=urb.in_data, status=urb.status)  # fmt: skip
    return synth.pcap(frames, LINKTYPE_USB_LINUX_MMAPPED if mmapped else LINKTYPE_USB_LINUX)
