"""captures.layers.usbip: every USB/IP message, the direction rule, ISO descriptors, TCP reassembly.

Golden bytes come from the kernel's Documentation/usb/usbip_protocol.rst (EXAMPLE section) and from the
layouts of its message tables; streams are cut at every place hypothesis likes.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP
from scapy.packet import Raw
from scapy.utils import rdpcap

from captures import synth
from captures.layers import read_packets
from captures.layers.bot_scsi import BOT_CBW, BOT_CSW, SCSI_InquiryData, SCSI_Read10
from captures.layers.usb import USB_DeviceDescriptor, USB_Setup
from captures.layers.usbip import (
    USBIP,
    SubmitInfo,
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
    UsbipConversation,
    dissect_message,
    dissecting,
    message_bytes,
    message_length,
    usbip_messages,
)
from captures.reader import LINKTYPE_ETHERNET

# Documentation/usb/usbip_protocol.rst, EXAMPLE: an HID device's interrupt IN and OUT URBs.
_H = bytes.fromhex
CMD_INTR_IN = _H(
    "00000001 00000d05 0001000f 00000001 00000001 00000200 00000040 ffffffff 00000000 00000004 00000000 00000000"
)
CMD_INTR_OUT = _H(
    "00000001 00000d06 0001000f 00000000 00000001 00000000 00000040 ffffffff 00000000 00000004 00000000 00000000"
)
OUT_DATA = _H("ffffffff860008a784ce5ae21237630000000000000000000000000000000000" + "00" * 32)
RET_INTR_OUT = _H(
    "00000003 00000d06 00000000 00000000 00000000 00000000 00000040 ffffffff 00000000 00000000 00000000 00000000"
)
RET_INTR_IN = _H(
    "00000003 00000d05 00000000 00000000 00000000 00000000 00000040 ffffffff 00000000 00000000 00000000 00000000"
)
IN_DATA = _H("ffffffff860011a784ce5ae2123763612891b1020100000400000000000000000000" + "00" * 30)


def test_rst_example_cmd_submit_in_has_no_buffer_and_kernel_field_values() -> None:
    m = USBIP(CMD_INTR_IN)
    assert isinstance(m, USBIP_CmdSubmit)
    assert (m.seqnum, m.devid, m.dir, m.ep) == (0xD05, 0x1000F, 1, 1)
    assert (m.transfer_flags, m.transfer_buffer_length, m.start_frame, m.number_of_packets, m.interval) == (
        0x200,
        64,
        -1,
        0,
        4,
    )
    assert m.transfer_buffer is None and m.iso_packet_descriptors == []
    assert bytes(m) == CMD_INTR_IN


def test_rst_example_cmd_submit_out_carries_transfer_buffer_length_bytes() -> None:
    m = USBIP(CMD_INTR_OUT + OUT_DATA)
    assert isinstance(m, USBIP_CmdSubmit) and m.dir == 0
    assert bytes(m.transfer_buffer) == OUT_DATA
    assert message_length(CMD_INTR_OUT + OUT_DATA) == 48 + 64


def test_rst_example_ret_submit_direction_comes_from_the_cmd_with_the_same_seqnum() -> None:
    conv = UsbipConversation()
    with dissecting(conv):
        USBIP(CMD_INTR_IN)
        USBIP(CMD_INTR_OUT + OUT_DATA)
        out = USBIP(RET_INTR_OUT + RET_INTR_IN + IN_DATA)  # OUT answer: no data although actual_length 64
        assert isinstance(out, USBIP_RetSubmit) and out.actual_length == 64 and out.transfer_buffer is None
        assert message_bytes(out) == RET_INTR_OUT
        inn = USBIP(RET_INTR_IN + IN_DATA)
        assert bytes(inn.transfer_buffer) == IN_DATA
        assert inn.submit == SubmitInfo(1, 1, 0x1000F, bytes(8), 0)
    assert message_length(RET_INTR_OUT + RET_INTR_IN + IN_DATA, conv) == 48
    assert message_length(RET_INTR_IN + IN_DATA, conv) == 48 + 64


def test_lone_ret_submit_infers_direction_from_what_follows() -> None:
    assert bytes(dissect_message(RET_INTR_IN + IN_DATA).transfer_buffer) == IN_DATA
    assert dissect_message(RET_INTR_OUT).transfer_buffer is None
    assert dissect_message(RET_INTR_IN + IN_DATA, direction=0).transfer_buffer is None


def test_iso_packet_descriptors_follow_the_transfer_buffer() -> None:
    isos = [
        USBIP_IsoPacketDescriptor(offset=0, length=8, actual_length=8),
        USBIP_IsoPacketDescriptor(offset=8, length=8),
    ]
    cmd = USBIP_CmdSubmit(
        seqnum=9, devid=0x10002, dir=0, ep=3, transfer_buffer=b"A" * 16, iso_packet_descriptors=isos
    )
    raw = bytes(cmd)
    assert struct.unpack_from(">ii", raw, 24) == (16, 0) and struct.unpack_from(">i", raw, 32) == (2,)
    assert raw[48:64] == b"A" * 16
    assert struct.unpack_from(">IIIi", raw, 64) == (0, 8, 8, 0)
    back = USBIP(raw)
    assert [(d.offset, d.length, d.actual_length) for d in back.iso_packet_descriptors] == [
        (0, 8, 8),
        (8, 8, 0),
    ]
    ret = USBIP_RetSubmit(seqnum=9, actual_length=0, iso_packet_descriptors=isos)
    assert len(bytes(ret)) == 48 + 32


def test_non_iso_number_of_packets_minus_one_means_no_descriptors() -> None:
    raw = bytes(USBIP_CmdSubmit(seqnum=1, dir=1, ep=1, transfer_buffer_length=512, number_of_packets=-1))
    assert raw[32:36] == b"\xff\xff\xff\xff"
    assert message_length(raw) == 48
    assert USBIP(raw).iso_packet_descriptors == []


def test_cmd_unlink_and_ret_unlink_layouts() -> None:
    unlink = bytes(USBIP_CmdUnlink(seqnum=7, devid=0x10002, unlink_seqnum=5))
    assert len(unlink) == 48 and struct.unpack_from(">IIII", unlink, 0)[:2] == (2, 7)
    assert struct.unpack_from(">I", unlink, 20) == (5,) and unlink[24:] == bytes(24)
    ret = bytes(USBIP_RetUnlink(seqnum=7, status=-104))
    assert struct.unpack_from(">i", ret, 20) == (-104,) and len(ret) == 48
    assert USBIP(ret).answers(USBIP(unlink))


def test_op_req_import_and_successful_reply_with_device_record() -> None:
    req = bytes(USBIP_OpReqImport(busid=b"1-1"))
    assert req[:8] == _H("0111 8003 00000000") and req[8:11] == b"1-1" and len(req) == 40
    udev = USBIP_Device(
        path=b"/sys/devices/platform/vhci/usb1/1-1", busid=b"1-1", busnum=1, devnum=2, idVendor=0x1D6B
    )
    rep = bytes(USBIP_OpRepImport(udev=udev))
    assert len(rep) == 8 + 312 and rep[:8] == _H("0111 0003 00000000")
    back = USBIP(rep)
    assert isinstance(back, USBIP_OpRepImport) and back.udev.busid == b"1-1" and back.udev.devid == 0x10002


def test_failed_import_reply_is_only_the_eight_byte_header() -> None:
    rep = bytes(USBIP_OpRepImport(status=4))
    assert rep == _H("0111 0003 00000004")
    assert message_length(rep + CMD_INTR_IN) == 8
    back = USBIP(rep)
    assert back.status == 4 and back.udev is None


def test_devlist_reply_lists_devices_with_their_interfaces() -> None:
    dev = USBIP_ExportedDevice(
        busid=b"1-1",
        busnum=1,
        devnum=2,
        interfaces=[USBIP_Interface(bInterfaceClass=8, bInterfaceSubClass=6, bInterfaceProtocol=0x50)],
    )
    dev2 = USBIP_ExportedDevice(
        busid=b"1-2",
        busnum=1,
        devnum=3,
        interfaces=[USBIP_Interface(bInterfaceClass=3), USBIP_Interface(bInterfaceClass=3)],
    )
    raw = bytes(USBIP_OpRepDevlist(devices=[dev, dev2]))
    assert len(raw) == 12 + 312 + 4 + 312 + 8
    assert raw[8:12] == _H("00000002") and raw[12 + 311] == 1
    assert message_length(raw + b"trailing") == len(raw)
    back = USBIP(raw)
    assert back.ndev == 2 and [d.bNumInterfaces for d in back.devices] == [1, 2]
    assert back.devices[0].interfaces[0].bInterfaceClass == 8


def test_failed_devlist_reply_is_only_the_eight_byte_header() -> None:
    assert bytes(USBIP_OpRepDevlist(status=5)) == _H("0111 0005 00000005")
    assert message_length(_H("0111 0005 00000005")) == 8


def test_op_req_devlist_is_eight_bytes() -> None:
    assert bytes(USBIP_OpReqDevlist()) == _H("0111 8005 00000000")


def test_message_length_asks_for_more_or_rejects_garbage() -> None:
    assert message_length(CMD_INTR_OUT[:20]) is None
    assert message_length(b"\x01\x11\x00\x05") is None
    assert message_length(b"GET / HTTP") == 0
    assert message_length(_H("00000009 00000000")) == 0


def test_setup_packet_of_a_control_cmd_submit_decodes_as_usb_setup() -> None:
    setup = USB_Setup(bmRequestType=0x80, bRequest=6, wValue=0x0100, wLength=18)
    raw = bytes(USBIP_CmdSubmit(seqnum=1, devid=0x10002, dir=1, ep=0, transfer_buffer_length=18, setup=setup))
    assert raw[40:48] == _H("8006000100001200")
    back = USBIP(raw)
    assert back.setup.bRequest == 6 and back.setup.wLength == 18


def test_control_in_answer_is_decoded_as_descriptors_when_the_cmd_asked_for_them() -> None:
    conv = UsbipConversation()
    desc = bytes(USB_DeviceDescriptor(idVendor=0x1D6B, idProduct=0x0104))
    with dissecting(conv):
        USBIP(
            bytes(
                USBIP_CmdSubmit(
                    seqnum=1,
                    dir=1,
                    ep=0,
                    transfer_buffer_length=18,
                    setup=USB_Setup(wValue=0x100, wLength=18),
                )
            )
        )
        ret = USBIP(bytes(USBIP_RetSubmit(seqnum=1, transfer_buffer=desc)))
    assert ret[USB_DeviceDescriptor].idVendor == 0x1D6B


def test_bulk_cbw_data_and_csw_are_decoded_with_the_open_command() -> None:
    conv = UsbipConversation()
    cbw = bytes(
        BOT_CBW(dCBWTag=5, dCBWDataTransferLength=36, bmCBWFlags=0x80, CBWCB=bytes.fromhex("120000002400"))
    )
    with dissecting(conv):
        cmd = USBIP(bytes(USBIP_CmdSubmit(seqnum=1, devid=0x10002, dir=0, ep=2, transfer_buffer=cbw)))
        USBIP(bytes(USBIP_RetSubmit(seqnum=1, actual_length=31)))
        USBIP(bytes(USBIP_CmdSubmit(seqnum=2, devid=0x10002, dir=1, ep=1, transfer_buffer_length=36)))
        data = USBIP(bytes(USBIP_RetSubmit(seqnum=2, transfer_buffer=bytes(SCSI_InquiryData()))))
        USBIP(bytes(USBIP_CmdSubmit(seqnum=3, devid=0x10002, dir=1, ep=1, transfer_buffer_length=13)))
        csw = USBIP(bytes(USBIP_RetSubmit(seqnum=3, transfer_buffer=bytes(BOT_CSW(dCSWTag=5)))))
    assert cmd[BOT_CBW].dCBWTag == 5
    assert data[SCSI_InquiryData].t10_vendor_identification == b"vusb    "
    assert csw[BOT_CSW].dCSWTag == 5
    assert conv.bot == {}


# --- over TCP ------------------------------------------------------------------------------------------------------


def _session_messages() -> list[tuple[bool, bytes]]:
    """(to server, message bytes) of a short import + enumeration + one SCSI command + an unlink."""
    udev = USBIP_Device(busid=b"1-1", busnum=1, devnum=2, idVendor=0x1D6B, idProduct=0x0104)
    cbw = bytes(
        BOT_CBW(dCBWTag=1, dCBWDataTransferLength=4096, bmCBWFlags=0x80, CBWCB=SCSI_Read10(transfer_length=8))
    )
    desc = bytes(USB_DeviceDescriptor(idVendor=0x1D6B, idProduct=0x0104))
    return [
        (True, bytes(USBIP_OpReqImport(busid=b"1-1"))),
        (False, bytes(USBIP_OpRepImport(udev=udev))),
        (
            True,
            bytes(
                USBIP_CmdSubmit(
                    seqnum=1,
                    devid=0x10002,
                    dir=1,
                    ep=0,
                    transfer_buffer_length=18,
                    setup=USB_Setup(wValue=0x100, wLength=18),
                )
            ),
        ),
        (False, bytes(USBIP_RetSubmit(seqnum=1, transfer_buffer=desc))),
        (True, bytes(USBIP_CmdSubmit(seqnum=2, devid=0x10002, dir=0, ep=2, transfer_buffer=cbw))),
        (False, bytes(USBIP_RetSubmit(seqnum=2, actual_length=31))),
        (True, bytes(USBIP_CmdSubmit(seqnum=3, devid=0x10002, dir=1, ep=1, transfer_buffer_length=4096))),
        (False, bytes(USBIP_RetSubmit(seqnum=3, transfer_buffer=bytes(range(256)) * 16))),
        (True, bytes(USBIP_CmdSubmit(seqnum=4, devid=0x10002, dir=1, ep=1, transfer_buffer_length=13))),
        (False, bytes(USBIP_RetSubmit(seqnum=4, transfer_buffer=bytes(BOT_CSW(dCSWTag=1))))),
        (True, bytes(USBIP_CmdSubmit(seqnum=5, devid=0x10002, dir=1, ep=1, transfer_buffer_length=31))),
        (True, bytes(USBIP_CmdUnlink(seqnum=6, devid=0x10002, unlink_seqnum=5))),
        (False, bytes(USBIP_RetUnlink(seqnum=6, status=-104))),
    ]


def _write_session(path: Path, messages: list[tuple[bool, bytes]], cuts: dict[bool, list[int]]) -> None:
    """Both directions' byte streams, cut at the given stream offsets; segments sent in causal order."""
    conn = synth.TcpConnection()
    frames = [(1.0 + i * 1e-3, f) for i, f in enumerate(conn.handshake())]
    streams = {True: b"", False: b""}
    for to_server, msg in messages:
        start = len(streams[to_server])
        streams[to_server] += msg
        local = [c - start for c in cuts.get(to_server, []) if start < c < start + len(msg)]
        for f in conn.send(to_server, msg, local):
            frames.append((1.0 + len(frames) * 1e-3, f))
    path.write_bytes(synth.pcap(frames, LINKTYPE_ETHERNET))


def _coalesce(messages: list[tuple[bool, bytes]]) -> list[tuple[bool, bytes]]:
    """Consecutive messages of one direction in one segment each."""
    out: list[tuple[bool, bytes]] = []
    for to_server, msg in messages:
        if out and out[-1][0] == to_server:
            out[-1] = (to_server, out[-1][1] + msg)
        else:
            out.append((to_server, msg))
    return out


def _reassembled(path: Path) -> list[tuple[bool, bytes, type]]:
    out = []
    for pkt in read_packets(path):
        if TCP not in pkt:
            continue
        to_server = pkt[TCP].dport == 3240
        for layer in usbip_messages(pkt):
            out.append((to_server, message_bytes(layer), type(layer)))
    return out


def test_tcp_session_yields_every_message_once_when_each_has_its_segment(tmp_path: Path) -> None:
    messages = _session_messages()
    _write_session(tmp_path / "s.pcap", messages, {})
    got = _reassembled(tmp_path / "s.pcap")
    assert [(d, b) for d, b, _ in got] == messages
    assert [t.__name__ for _d, _b, t in got][:4] == [
        "USBIP_OpReqImport",
        "USBIP_OpRepImport",
        "USBIP_CmdSubmit",
        "USBIP_RetSubmit",
    ]


def test_several_messages_in_one_segment_come_out_chained(tmp_path: Path) -> None:
    messages = _session_messages()
    path = tmp_path / "s.pcap"
    _write_session(path, _coalesce(messages), {})
    assert [(d, b) for d, b, _ in _reassembled(path)] == messages
    # frame by frame (rdpcap, no session) decodes the same, since no message straddles segments
    chained = [message_bytes(m) for p in rdpcap(str(path)) if TCP in p for m in usbip_messages(p)]
    assert chained == [b for _, b in messages]


def test_a_message_split_across_segments_is_reassembled(tmp_path: Path) -> None:
    messages = _session_messages()
    path = tmp_path / "s.pcap"
    total = {True: 0, False: 0}
    for d, m in messages:
        total[d] += len(m)
    cuts = {True: list(range(5, total[True], 37)), False: list(range(3, total[False], 1000))}
    _write_session(path, messages, cuts)
    assert [(d, b) for d, b, _ in _reassembled(path)] == messages


def test_rdpcap_without_session_shows_the_continuation_of_a_split_message_as_raw(tmp_path: Path) -> None:
    messages = [(True, CMD_INTR_OUT + OUT_DATA)]
    path = tmp_path / "s.pcap"
    _write_session(path, messages, {True: [60]})
    frames = [p for p in rdpcap(str(path)) if TCP in p and p[TCP].payload]
    assert isinstance(frames[0][TCP].payload, USBIP_CmdSubmit)
    assert isinstance(frames[1][TCP].payload, Raw)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_split_of_both_streams_reassembles_to_the_same_messages(
    tmp_path: Path, data: st.DataObject
) -> None:
    messages = _session_messages()
    messages_on_wire = _coalesce(messages) if data.draw(st.booleans(), label="coalesce") else messages
    total = {True: 0, False: 0}
    for d, m in messages_on_wire:
        total[d] += len(m)
    cuts = {
        d: data.draw(st.lists(st.integers(1, total[d] - 1), max_size=12), label=f"cuts {d}")
        for d in (True, False)
    }
    path = tmp_path / "split.pcap"
    _write_session(path, messages_on_wire, cuts)
    assert [(d, b) for d, b, _ in _reassembled(path)] == messages


def test_garbage_at_the_start_of_a_stream_becomes_raw_and_is_let_go(tmp_path: Path) -> None:
    conn = synth.TcpConnection()
    frames = [(1.0, f) for f in conn.send(True, b"\xde\xad\xbe\xef" * 4)]
    frames += [(2.0, f) for f in conn.send(True, CMD_INTR_IN)]
    path = tmp_path / "g.pcap"
    path.write_bytes(synth.pcap(frames, LINKTYPE_ETHERNET))
    got = _reassembled(path)
    assert got == [(True, CMD_INTR_IN, USBIP_CmdSubmit)]


@pytest.mark.parametrize("port_side", ["sport", "dport"])
def test_port_3240_binds_usbip_on_either_side(port_side: str) -> None:
    from scapy.layers.inet import IP

    kw = {port_side: 3240, ("dport" if port_side == "sport" else "sport"): 40000}
    pkt = IP(bytes(IP() / TCP(**kw) / CMD_INTR_IN))
    assert isinstance(pkt[TCP].payload, USBIP_CmdSubmit)
