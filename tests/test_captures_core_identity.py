"""The core codec (emulator.usbip) and the scapy layers (captures.layers.usbip) agree byte for byte.

Both directions, for every message kind the core knows: scapy dissects the core's bytes to the same field values,
and the bytes scapy builds from those values decode in the core to the same message (and are the core's bytes).
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.packet import Packet
from usbip_strategies import (
    cmd_submits,
    cmd_unlinks,
    op_rep_devlists,
    op_rep_imports,
    op_req_devlists,
    op_req_imports,
    ret_submits_with_direction,
    ret_unlinks,
)

from captures.layers.usb import USB_Setup
from captures.layers.usbip import (
    USBIP_CmdSubmit,
    USBIP_CmdUnlink,
    USBIP_Device,
    USBIP_ExportedDevice,
    USBIP_Interface,
    USBIP_IsoPacketDescriptor,
    USBIP_OpRepDevlist,
    USBIP_OpRepImport,
    USBIP_OpReqDevlist,
    USBIP_OpReqImport,
    USBIP_RetSubmit,
    USBIP_RetUnlink,
    dissect_message,
    message_bytes,
)
from emulator.usbip import (
    CmdSubmit,
    CmdUnlink,
    Message,
    OpRepDevlist,
    OpRepImport,
    OpReqDevlist,
    OpReqImport,
    RetSubmit,
    RetUnlink,
    UsbDevice,
    pack,
    unpack,
)

DEVICE_FIELDS = ("busnum", "devnum", "speed", "idVendor", "idProduct", "bcdDevice", "bDeviceClass", "bDeviceSubClass",
                 "bDeviceProtocol", "bConfigurationValue", "bNumConfigurations", "bNumInterfaces")  # fmt: skip


def _device_kwargs(udev: UsbDevice) -> dict[str, Any]:
    kw = {name: getattr(udev, name) for name in DEVICE_FIELDS}
    kw.update(path=udev.path.encode(), busid=udev.busid.encode())
    return kw


def _isos(m: CmdSubmit | RetSubmit) -> list[USBIP_IsoPacketDescriptor]:
    return [
        USBIP_IsoPacketDescriptor(
            offset=d.offset, length=d.length, actual_length=d.actual_length, status=d.status
        )
        for d in m.iso_packet_descriptors
    ]


def to_scapy(m: Message) -> Packet:
    """The scapy layer holding the same field values as a core message."""
    if isinstance(m, CmdSubmit):
        return USBIP_CmdSubmit(
            seqnum=m.seqnum, devid=m.devid, dir=m.direction, ep=m.ep, transfer_flags=m.transfer_flags,
            transfer_buffer_length=m.transfer_buffer_length, start_frame=m.start_frame,
            number_of_packets=m.number_of_packets, interval=m.interval, setup=USB_Setup(m.setup),
            transfer_buffer=m.transfer_buffer, iso_packet_descriptors=_isos(m),
        )  # fmt: skip
    if isinstance(m, RetSubmit):
        return USBIP_RetSubmit(
            seqnum=m.seqnum, devid=m.devid, dir=m.direction, ep=m.ep, status=m.status, actual_length=m.actual_length,
            start_frame=m.start_frame, number_of_packets=m.number_of_packets, error_count=m.error_count,
            transfer_buffer=m.transfer_buffer, iso_packet_descriptors=_isos(m),
        )  # fmt: skip
    if isinstance(m, CmdUnlink):
        return USBIP_CmdUnlink(
            seqnum=m.seqnum, devid=m.devid, dir=m.direction, ep=m.ep, unlink_seqnum=m.unlink_seqnum
        )
    if isinstance(m, RetUnlink):
        return USBIP_RetUnlink(seqnum=m.seqnum, devid=m.devid, dir=m.direction, ep=m.ep, status=m.status)
    if isinstance(m, OpReqDevlist):
        return USBIP_OpReqDevlist()
    if isinstance(m, OpReqImport):
        return USBIP_OpReqImport(busid=m.busid.encode())
    if isinstance(m, OpRepImport):
        if m.udev is None:
            return USBIP_OpRepImport(status=m.status)
        return USBIP_OpRepImport(status=m.status, udev=USBIP_Device(**_device_kwargs(m.udev)))
    if isinstance(m, OpRepDevlist):
        if m.status != 0:
            return USBIP_OpRepDevlist(status=m.status)
        devices = []
        for extra in m.devices:
            kw = _device_kwargs(extra.udev)
            kw.pop("bNumInterfaces")
            interfaces = [
                USBIP_Interface(bInterfaceClass=i.bInterfaceClass, bInterfaceSubClass=i.bInterfaceSubClass,
                                bInterfaceProtocol=i.bInterfaceProtocol)
                for i in extra.uinf
            ]  # fmt: skip
            devices.append(USBIP_ExportedDevice(interfaces=interfaces, **kw))
        return USBIP_OpRepDevlist(status=m.status, devices=devices)
    raise AssertionError(f"no scapy layer for {m!r}")


def scapy_values(p: Packet) -> Any:
    """Field values of a dissected scapy message, normalised like `core_values`."""
    if isinstance(p, USBIP_CmdSubmit | USBIP_RetSubmit):
        names = [
            f.name
            for f in p.fields_desc
            if f.name not in ("setup", "transfer_buffer", "iso_packet_descriptors", "padding")
        ]
        values = {n: p.getfieldval(n) for n in names}
        if isinstance(p, USBIP_CmdSubmit):
            values["setup"] = bytes(p.setup)
        values["transfer_buffer"] = bytes(p.transfer_buffer) if p.transfer_buffer is not None else b""
        values["isos"] = [(d.offset, d.length, d.actual_length, d.status) for d in p.iso_packet_descriptors]
        return values
    if isinstance(p, USBIP_CmdUnlink | USBIP_RetUnlink):
        return {f.name: p.getfieldval(f.name) for f in p.fields_desc if f.name != "padding"}
    if isinstance(p, USBIP_OpReqImport):
        return {"code": p.code, "busid": p.busid}
    if isinstance(p, USBIP_OpRepImport):
        udev = p.udev
        return {"code": p.code, "status": p.status, "udev": None if udev is None else _scapy_device(udev)}
    if isinstance(p, USBIP_OpRepDevlist):
        devices = [(_scapy_device(d), [(i.bInterfaceClass, i.bInterfaceSubClass, i.bInterfaceProtocol) for i in d.interfaces])
                   for d in (p.devices or [])]  # fmt: skip
        return {"code": p.code, "status": p.status, "devices": devices}
    return {"code": p.code, "status": p.status}


def _scapy_device(d: Packet) -> dict[str, Any]:
    return {"path": d.path, "busid": d.busid, **{n: d.getfieldval(n) for n in DEVICE_FIELDS}}


def core_values(m: Message) -> Any:
    if isinstance(m, CmdSubmit | RetSubmit):
        values: dict[str, Any] = {
            "command": m.command,
            "seqnum": m.seqnum,
            "devid": m.devid,
            "dir": m.direction,
            "ep": m.ep,
        }
        if isinstance(m, CmdSubmit):
            values.update(transfer_flags=m.transfer_flags, transfer_buffer_length=m.transfer_buffer_length,
                          start_frame=m.start_frame, number_of_packets=m.number_of_packets, interval=m.interval,
                          setup=m.setup)  # fmt: skip
        else:
            values.update(status=m.status, actual_length=m.actual_length, start_frame=m.start_frame,
                          number_of_packets=m.number_of_packets, error_count=m.error_count)  # fmt: skip
        values["transfer_buffer"] = m.transfer_buffer
        values["isos"] = [(d.offset, d.length, d.actual_length, d.status) for d in m.iso_packet_descriptors]
        return values
    if isinstance(m, CmdUnlink):
        return {"command": m.command, "seqnum": m.seqnum, "devid": m.devid, "dir": m.direction, "ep": m.ep,
                "unlink_seqnum": m.unlink_seqnum}  # fmt: skip
    if isinstance(m, RetUnlink):
        return {"command": m.command, "seqnum": m.seqnum, "devid": m.devid, "dir": m.direction, "ep": m.ep,
                "status": m.status}  # fmt: skip
    if isinstance(m, OpReqImport):
        return {"code": m.code, "busid": m.busid.encode()}
    if isinstance(m, OpRepImport):
        return {"code": m.code, "status": m.status, "udev": None if m.udev is None else _core_device(m.udev)}
    if isinstance(m, OpRepDevlist):
        devices = [(_core_device(e.udev), [(i.bInterfaceClass, i.bInterfaceSubClass, i.bInterfaceProtocol) for i in e.uinf])
                   for e in m.devices]  # fmt: skip
        return {"code": m.code, "status": m.status, "devices": devices}
    return {"code": m.code, "status": 0}


def _core_device(u: UsbDevice) -> dict[str, Any]:
    return {"path": u.path.encode(), "busid": u.busid.encode(), **{n: getattr(u, n) for n in DEVICE_FIELDS}}


messages_with_direction = st.one_of(
    cmd_submits().map(lambda m: (m, None)),
    ret_submits_with_direction(),
    cmd_unlinks.map(lambda m: (m, None)),
    ret_unlinks.map(lambda m: (m, None)),
    op_req_devlists.map(lambda m: (m, None)),
    op_req_imports.map(lambda m: (m, None)),
    op_rep_imports.map(lambda m: (m, None)),
    op_rep_devlists.map(lambda m: (m, None)),
)


@settings(max_examples=150, deadline=None)
@given(messages_with_direction)
def test_scapy_dissects_core_bytes_to_the_same_fields_and_length(case: tuple[Message, int | None]) -> None:
    message, direction = case
    wire = pack(message)
    pkt = dissect_message(wire, direction=direction)
    assert scapy_values(pkt) == core_values(message)
    assert len(message_bytes(pkt)) == len(wire)
    assert not pkt.payload  # nothing left over: scapy framed exactly the core's message


@settings(max_examples=150, deadline=None)
@given(messages_with_direction)
def test_scapy_built_bytes_are_the_core_bytes_and_decode_in_the_core(
    case: tuple[Message, int | None],
) -> None:
    message, direction = case
    built = bytes(to_scapy(message))
    assert built == pack(message)
    assert unpack(built, direction=direction) == message
