"""Our dissection against tshark's, field by field, on the same captures (USB/IP over TCP; usbmon 189 and 220).

tshark (Wireshark's packet-usbip.c, packet-usb.c, packet-usbms.c, packet-scsi*.c) is the reference. Its PDML
output keeps each USB/IP PDU apart and marks generated fields (size 0: devid/ep restored from the CMD, request
and response frames), so every wire field compares with the scapy layers through their WIRESHARK_FIELDS tables,
and every generated one with captures.transactions' pairing. Known tshark 4.0 limits the captures stay within:
number_of_packets is 0 for non-ISO URBs (0xffffffff derails its PDU length), a failed RET_SUBMIT ends its
segment (tshark takes the rest of the segment as that PDU), and a RET_SUBMIT with IN data does not follow another
RET_SUBMIT in the same segment (tshark 4.0 then leaves the data out of the PDU and shows it as a separate
undecoded `usbip.data`; the kernel, captures.transactions and the scapy layers all attach it, which
tests/test_captures_usbip_layer.py and tests/test_captures_transactions.py check). Several CMD_SUBMITs in one
segment are fine for tshark and are in the capture.
"""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

import captures_script as script
import pytest
from scapy.layers.inet import TCP
from scapy.packet import Packet

from captures.layers import bot_scsi, read_packets, usb, usbip, usbmon
from captures.layers.bot_scsi import (
    BOT_CBW,
    BOT_CSW,
    SCSI_FixedSenseData,
    SCSI_InquiryData,
    SCSI_ReadCapacity10Data,
)
from captures.layers.usb import USB_Descriptor, USB_Setup
from captures.layers.usbip import (
    USBIP_CmdSubmit,
    USBIP_OpRepImport,
    USBIP_RetSubmit,
    message_bytes,
    usbip_messages,
)
from captures.transactions import analyze

TSHARK = shutil.which("tshark")
pytestmark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")


class Pdu:
    """One protocol data unit as tshark showed it: the usbip proto (or usbmon's usb proto) and what followed."""

    def __init__(self, frame: int, size: int) -> None:
        self.frame = frame
        self.size = size
        self.wire: dict[str, list[str]] = defaultdict(list)
        self.generated: dict[str, list[str]] = defaultdict(list)
        self.upper: dict[str, list[str]] = defaultdict(list)  # usb, usbms, scsi fields above the transport


def _pdml(path: Path, *args: str) -> list[list[Any]]:
    out = subprocess.run(
        [TSHARK or "tshark", "-2", "-r", str(path), "-T", "pdml", *args],
        capture_output=True,
        check=True,
        timeout=300,
    ).stdout
    packets = []
    for packet in ET.fromstring(out).iter("packet"):
        protos = []
        for proto in packet.findall("proto"):
            fields = [
                (f.get("name") or "", f.get("show") or "", f.get("size") not in (None, "0"))
                for f in proto.iter("field")
            ]
            protos.append((proto.get("name"), int(proto.get("size") or 0), fields))
        packets.append(protos)
    return packets


def _pdus(packets: list[list[Any]], transport: str) -> list[Pdu]:
    pdus: list[Pdu] = []
    for number, protos in enumerate(packets, 1):
        current: Pdu | None = None
        for name, size, fields in protos:
            if name == transport:
                current = Pdu(number, size)
                pdus.append(current)
                for fname, show, on_wire in fields:
                    (current.wire if on_wire else current.generated)[fname].append(show)
            elif current is not None and name in ("usb", "usbms", "scsi", "fake-field-wrapper"):
                for fname, show, _on_wire in fields:
                    if fname.startswith(("usb.", "usbms.", "scsi")):
                        current.upper[fname].append(show)
    return pdus


def _num(show: str) -> int:
    if show.startswith("'"):
        inner = show[1:-1]
        return 0 if inner == "\\0" else ord(inner)
    return int(show, 0)


def _value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.split(b"\0", 1)[0].decode("ascii", "replace")
    return v


def _flat_fields(pkt: Packet, table: dict[str, str], skip: tuple[str, ...] = ()) -> dict[str, list[Any]]:
    """Our values per Wireshark field, in wire order, for the fields of `pkt` (and its sub-packets) in `table`."""
    out: dict[str, list[Any]] = defaultdict(list)
    for f in pkt.fields_desc:
        if f.name in skip:
            continue
        value = pkt.getfieldval(f.name)
        if f.name not in pkt.fields and getattr(f, "cond", None) is not None:
            continue  # a conditional field that is absent
        if isinstance(value, Packet):
            for k, v in _flat_fields(value, table, skip).items():
                out[k].extend(v)
        elif f.name in table and value is not None:
            out[table[f.name]].append(_value(value))
    return out


class Comparer:
    """Counts what was compared, so a test cannot pass by comparing nothing."""

    def __init__(self) -> None:
        self.compared: dict[str, int] = defaultdict(int)

    def fields(self, ours: dict[str, list[Any]], theirs: dict[str, list[str]], where: str) -> None:
        for name, values in ours.items():
            if name not in theirs:
                continue
            got = theirs[name]
            if values and isinstance(values[0], str):
                assert [v.strip() for v in values] == [g.strip() for g in got], f"{where}: {name}"
            else:
                assert values == [_num(g) for g in got], f"{where}: {name}: ours {values}, tshark {got}"
            self.compared[name] += 1

    def one(self, name: str, ours: Any, theirs: dict[str, list[str]], where: str, index: int = 0) -> None:
        assert name in theirs, f"{where}: tshark has no {name}"
        got = theirs[name][index]
        assert got == ours if isinstance(ours, str) else _num(got) == ours, (
            f"{where}: {name}: ours {ours!r}, tshark {got!r}"
        )
        self.compared[name] += 1


def _upper_compare(cmp: Comparer, layer: Packet | None, theirs: dict[str, list[str]], where: str) -> None:
    """USB descriptors, BOT wrappers and SCSI data carried by a transfer."""
    if layer is None:
        return
    if isinstance(layer, USB_Descriptor):
        ours: dict[str, list[Any]] = defaultdict(list)
        for d in layer.iterpayloads():
            if isinstance(d, USB_Descriptor):
                for k, v in _flat_fields(d, usb.WIRESHARK_FIELDS, skip=("extra", "data")).items():
                    ours[k].extend(v)
        cmp.fields(ours, theirs, where)
    if isinstance(layer, BOT_CBW):
        cmp.fields(
            _flat_fields(layer, bot_scsi.WIRESHARK_FIELDS, skip=("CBWCB", "CBWCB_padding")), theirs, where
        )
        cmp.one("scsi_sbc.opcode", layer.cdb.opcode, theirs, where)
    if isinstance(layer, BOT_CSW):
        cmp.fields(_flat_fields(layer, bot_scsi.WIRESHARK_FIELDS), theirs, where)
    if isinstance(layer, SCSI_InquiryData):
        cmp.one("scsi.inquiry.version", layer.version, theirs, where)
        cmp.one("scsi.inquiry.vendor_id", layer.t10_vendor_identification.decode(), theirs, where)
        cmp.one("scsi.inquiry.product_id", layer.product_identification.decode(), theirs, where)
    if isinstance(layer, SCSI_FixedSenseData):
        cmp.one("scsi.sns.key", layer.sense_key, theirs, where)
        cmp.one("scsi.sns.asc", layer.additional_sense_code, theirs, where)
    if isinstance(layer, SCSI_ReadCapacity10Data):
        cmp.one("scsi_sbc.returned_lba", layer.returned_logical_block_address, theirs, where)
        cmp.one("scsi_sbc.blocksize", layer.logical_block_length, theirs, where)


# --- USB/IP --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def usbip_capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tshark") / "usbip.pcap"
    path.write_bytes(script.usbip_capture(script.mass_storage_urbs()))
    return path


def test_usbip_every_pdu_and_wire_field_matches_tshark(usbip_capture: Path) -> None:
    theirs = _pdus(_pdml(usbip_capture, "-d", "tcp.port==3240,usbip"), "usbip")
    ours = [m for p in read_packets(usbip_capture) if TCP in p for m in usbip_messages(p)]
    assert len(ours) == len(theirs) == 2 + 2 * len(script.mass_storage_urbs())
    cmp = Comparer()
    for i, (m, t) in enumerate(zip(ours, theirs, strict=True)):
        where = f"PDU {i} (frame {t.frame}, {type(m).__name__})"
        assert len(message_bytes(m)) == t.size, f"{where}: length"
        cmp.fields(
            _flat_fields(m, usbip.WIRESHARK_FIELDS, skip=("setup", "transfer_buffer", "padding", "path")),
            t.wire,
            where,
        )
        if isinstance(m, USBIP_CmdSubmit) and m.ep == 0:
            cmp.fields(_flat_fields(m.setup, usb.WIRESHARK_FIELDS), t.upper, where)
        if isinstance(m, USBIP_CmdSubmit | USBIP_RetSubmit):
            _upper_compare(cmp, m.transfer_buffer, t.upper, where)
        if isinstance(m, USBIP_OpRepImport):
            cmp.one("usbip.system_path", m.udev.path.decode(), t.wire, where)
    for name in ("usbip.urb", "usbip.sequence_no", "usbip.devid", "usbip.endpoint_number",
                 "usbip.endpoint_number.direction", "usbip.transfer_buffer_length", "usbip.actual_length",
                 "usbip.status", "usbip.operation", "usbip.busid", "usbip.bus_num", "usbip.idVendor",
                 "usb.setup.bRequest", "usb.setup.wLength", "usb.idVendor", "usb.bInterfaceClass",
                 "usb.bEndpointAddress", "usbms.dCBWTag", "usbms.dCSWStatus", "scsi_sbc.opcode",
                 "scsi.inquiry.vendor_id", "scsi.sns.key", "scsi_sbc.returned_lba"):  # fmt: skip
        assert cmp.compared[name] > 0, f"{name} was never compared"


def test_usbip_pairing_matches_tshark_command_and_return_frames(usbip_capture: Path) -> None:
    theirs = [
        t for t in _pdus(_pdml(usbip_capture, "-d", "tcp.port==3240,usbip"), "usbip") if "usbip.urb" in t.wire
    ]
    analysis = analyze(usbip_capture)
    by_seqnum = {t.urb_id: t for t in analysis.transactions if t.kind == "submit"}
    rets = [t for t in theirs if _num(t.wire["usbip.urb"][0]) == 3]
    assert len(rets) == len(by_seqnum) == len(script.mass_storage_urbs())
    for ret in rets:
        ours = by_seqnum[_num(ret.wire["usbip.sequence_no"][0])]
        g = ret.generated
        assert (ours.frame, ours.response_frame) == (
            _num(g["usbip.cmd_frame"][0]),
            _num(g["usbip.ret_frame"][0]),
        )
        assert (ours.busnum << 16 | ours.devnum) == _num(g["usbip.devid"][0])
        assert ours.endpoint & 0x0F == _num(g["usbip.endpoint_number"][0])
        assert (ours.endpoint >> 7) == _num(g["usbip.endpoint_number.direction"][0])
        assert ours.status == _num(ret.wire["usbip.status"][0])


def test_usbip_scsi_commands_match_tshark_request_frames(usbip_capture: Path) -> None:
    theirs = _pdus(_pdml(usbip_capture, "-d", "tcp.port==3240,usbip"), "usbip")
    commands = {c.tag: c for c in analyze(usbip_capture).scsi_commands}
    checked = 0
    for t in theirs:
        if "usbms.dCSWStatus" in t.upper:
            cmd = commands[_num(t.upper["usbms.dCBWTag"][0])]
            assert cmd.frame == _num(t.upper["scsi.request_frame"][0])
            assert cmd.response_frame == t.frame
            assert cmd.csw_status == _num(t.upper["usbms.dCSWStatus"][0])
            assert cmd.opcode == _num(t.upper["scsi_sbc.opcode"][0])
            checked += 1
    assert checked == len(commands) == 6


# --- usbmon --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["usb_linux", "usb_linux_mmapped"])
def usbmon_capture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tshark") / f"usbmon-{request.param}.pcap"
    path.write_bytes(script.usbmon_capture(script.mass_storage_urbs(), mmapped=request.param))
    return path


def test_usbmon_every_record_field_matches_tshark(usbmon_capture: Path) -> None:
    theirs = _pdus(_pdml(usbmon_capture), "usb")
    ours = list(read_packets(usbmon_capture))
    assert len(ours) == len(theirs) == 2 * len(script.mass_storage_urbs())
    cmp = Comparer()
    for i, (p, t) in enumerate(zip(ours, theirs, strict=True)):
        where = f"frame {i + 1}"
        assert isinstance(p, usbmon.USBmon)
        cmp.fields(
            _flat_fields(p, usbmon.WIRESHARK_FIELDS, skip=("setup", "s", "iso_descriptors")), t.wire, where
        )
        if p.setup is not None:
            cmp.fields(_flat_fields(p.setup, usb.WIRESHARK_FIELDS), t.upper, where)
        payload = p.payload if p.payload else None
        _upper_compare(cmp, payload, t.upper, where)
    for name in ("usb.urb_id", "usb.urb_type", "usb.transfer_type", "usb.endpoint_address", "usb.device_address",
                 "usb.bus_id", "usb.setup_flag", "usb.data_flag", "usb.urb_ts_sec", "usb.urb_ts_usec",
                 "usb.urb_status", "usb.urb_len", "usb.data_len", "usb.setup.bRequest", "usb.idVendor",
                 "usb.bInterfaceClass", "usbms.dCBWTag", "usbms.dCSWStatus", "scsi_sbc.opcode", "scsi.sns.key"):  # fmt: skip
        assert cmp.compared[name] > 0, f"{name} was never compared"
    assert isinstance(ours[0].setup, USB_Setup)


def test_usbmon_pairing_matches_tshark_request_and_response_frames(usbmon_capture: Path) -> None:
    theirs = _pdus(_pdml(usbmon_capture), "usb")
    analysis = analyze(usbmon_capture)
    response_of = {t.frame: t.response_frame for t in analysis.transactions}
    request_of = {t.response_frame: t.frame for t in analysis.transactions}
    checked = 0
    for t in theirs:
        if "usb.response_in" in t.generated:
            assert response_of[t.frame] == _num(t.generated["usb.response_in"][0])
            checked += 1
        if "usb.request_in" in t.generated:
            assert request_of[t.frame] == _num(t.generated["usb.request_in"][0])
            checked += 1
    assert checked == 2 * len(script.mass_storage_urbs())


def test_usbmon_scsi_annotations_match_tshark(usbmon_capture: Path) -> None:
    theirs = _pdus(_pdml(usbmon_capture), "usb")
    analysis = analyze(usbmon_capture)
    opcode_at: dict[int, int | None] = {}
    for t in analysis.transactions:
        for frame in (t.frame, t.response_frame):
            if frame is not None:
                opcode_at[frame] = t.scsi_opcode
    commands = {c.tag: c for c in analysis.scsi_commands}
    annotated = 0
    for t in theirs:
        if "scsi_sbc.opcode" in t.upper:
            assert opcode_at[t.frame] == _num(t.upper["scsi_sbc.opcode"][0]), f"frame {t.frame}"
            annotated += 1
        if "usbms.dCSWStatus" in t.upper:
            cmd = commands[_num(t.upper["usbms.dCBWTag"][0])]
            assert (cmd.frame, cmd.response_frame) == (_num(t.upper["scsi.request_frame"][0]), t.frame)
            assert cmd.csw_status == _num(t.upper["usbms.dCSWStatus"][0])
    assert annotated == sum(3 if c.data_transfer_length else 2 for c in commands.values())  # CBW, data, CSW
