"""captures.transactions: pairing requests with responses in usbmon and USB/IP captures, and SCSI over BOT.

USB/IP streams are made of the core codec's bytes (emulator.usbip.pack) in synthetic TCP frames; usbmon
records come from captures.synth. The fast path is also held to the scapy layers on the same files.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP
from scapy.utils import rdpcap

from captures import synth
from captures.errors import CaptureError
from captures.layers import read_packets
from captures.layers.usbip import USBIP_CmdSubmit, USBIP_RetSubmit, usbip_messages
from captures.reader import LINKTYPE_ETHERNET, LINKTYPE_USB_LINUX, LINKTYPE_USB_LINUX_MMAPPED
from captures.transactions import Transaction, analyze, pair_transactions, percentile, summarize
from emulator.usbip import (
    CmdSubmit,
    CmdUnlink,
    OpRepImport,
    OpReqImport,
    RetSubmit,
    RetUnlink,
    UsbDevice,
    pack,
)

XFER_CONTROL, XFER_BULK = synth.XFER_CONTROL, synth.XFER_BULK
DEVID = 0x00010002


def _cbw(tag: int, length: int, cdb: bytes, data_in: bool = True) -> bytes:
    return (
        struct.pack("<IIIBBB", 0x43425355, tag, length, 0x80 if data_in else 0, 0, len(cdb))
        + cdb
        + bytes(16 - len(cdb))
    )


def _csw(tag: int, status: int = 0, residue: int = 0) -> bytes:
    return struct.pack("<IIIB", 0x53425355, tag, residue, status)


# --- usbmon --------------------------------------------------------------------------------------------------------


def test_usbmon_submissions_pair_with_completions_by_bus_and_urb_id() -> None:
    a = analyze(synth.usbmon_capture(2, mmapped=False, ng=False))
    assert a.protocols == {"usbmon"} and a.frames == a.records == 14 and a.warnings == []
    assert len(a.transactions) == 7
    for t in a.transactions:
        assert t.complete and t.status == 0 and t.response_frame == t.frame + 1
        assert t.latency == pytest.approx(1e-5, abs=2e-6)
    ctrl, cbw, data, csw = a.transactions[:4]
    assert (ctrl.transfer_type, ctrl.endpoint, ctrl.setup, ctrl.actual_length) == (
        "control", 0x80, bytes.fromhex("8006000100001200"), 18,
    )  # fmt: skip
    assert (cbw.bot, cbw.scsi_name, cbw.direction) == ("CBW", "READ_10", "out")
    assert (data.bot, data.scsi_name, data.requested_length, data.actual_length) == (
        "data",
        "READ_10",
        4096,
        4096,
    )
    assert (csw.bot, csw.bot_tag, csw.csw_status) == ("CSW", 1, 0)


def test_usbmon_scsi_commands_pair_cbw_and_csw_by_tag() -> None:
    a = analyze(synth.usbmon_capture(3))
    assert [
        (c.tag, c.name, c.logical_block_address, c.blocks, c.csw_status, c.data_bytes)
        for c in a.scsi_commands
    ] == [
        (1, "READ_10", 0, 8, 0, 4096),
        (2, "READ_10", 8, 8, 0, 4096),
        (3, "READ_10", 16, 8, 0, 4096),
    ]
    cmd = a.scsi_commands[0]
    assert (cmd.frame, cmd.response_frame) == (3, 8)
    assert cmd.latency == pytest.approx(5e-5, abs=2e-6)


def _usbmon(records: Sequence[bytes], *, mmapped: bool = False, big_endian: bool = False) -> bytes:
    linktype = LINKTYPE_USB_LINUX_MMAPPED if mmapped else LINKTYPE_USB_LINUX
    return synth.pcap([(1.0 + i * 0.001, r) for i, r in enumerate(records)], linktype, big_endian=big_endian)


def test_usbmon_error_event_answers_the_submission_with_its_status() -> None:
    records = [
        synth.usbmon_record(
            urb_id=5, event="S", xfer_type=XFER_BULK, epnum=0x81, devnum=3, length=512, status=-115
        ),
        synth.usbmon_record(
            urb_id=5, event="E", xfer_type=XFER_BULK, epnum=0x81, devnum=3, length=0, status=-19
        ),
    ]
    (t,) = pair_transactions(_usbmon(records))
    assert (t.status, t.status_text, t.failed, t.response_frame) == (-19, "-ENODEV", True, 2)


def test_usbmon_reused_urb_id_pairs_each_submission_with_the_next_completion() -> None:
    records = []
    for length in (10, 20):
        records.append(
            synth.usbmon_record(
                urb_id=7, event="S", xfer_type=XFER_BULK, epnum=0x81, devnum=3, length=64, status=-115
            )
        )
        records.append(
            synth.usbmon_record(
                urb_id=7, event="C", xfer_type=XFER_BULK, epnum=0x81, devnum=3, data=b"x" * length
            )
        )
    assert [(t.frame, t.response_frame, t.actual_length) for t in pair_transactions(_usbmon(records))] == [
        (1, 2, 10),
        (3, 4, 20),
    ]


def test_usbmon_completion_without_submission_is_kept_with_unknown_request() -> None:
    records = [synth.usbmon_record(urb_id=8, event="C", xfer_type=XFER_BULK, epnum=0x02, devnum=3, length=31)]
    (t,) = pair_transactions(_usbmon(records))
    assert (t.frame, t.ts, t.response_frame, t.latency) == (None, None, 1, None)


@pytest.mark.parametrize("mmapped", [False, True])
def test_usbmon_big_endian_capture_reads_headers_in_the_file_byte_order(mmapped: bool) -> None:
    records = [r for _ts, r in synth.usbmon_mass_storage_records(1, mmapped=mmapped)]
    big = [
        synth.usbmon_record(urb_id=0x1122334455667788, event="S", xfer_type=XFER_BULK, epnum=0x02, devnum=9, busnum=0x0102,
                            data=_cbw(1, 0, bytes(6)), status=-115, mmapped=mmapped, big_endian=True),
        synth.usbmon_record(urb_id=0x1122334455667788, event="C", xfer_type=XFER_BULK, epnum=0x02, devnum=9, busnum=0x0102,
                            length=31, mmapped=mmapped, big_endian=True),
    ]  # fmt: skip
    assert records  # the little-endian ones are covered elsewhere
    (t,) = pair_transactions(_usbmon(big, mmapped=mmapped, big_endian=True))
    assert (t.urb_id, t.busnum, t.devnum, t.requested_length, t.bot, t.scsi_name) == (
        0x1122334455667788, 0x0102, 9, 31, "CBW", "TEST_UNIT_READY",
    )  # fmt: skip


def test_usbmon_mmapped_data_starts_after_the_iso_descriptors() -> None:
    records = [
        synth.usbmon_record(urb_id=1, event="S", xfer_type=0, epnum=0x83, devnum=2, length=6, status=-115,
                            mmapped=True, iso_descriptors=[(0, 0, 3), (0, 3, 3)]),
        synth.usbmon_record(urb_id=1, event="C", xfer_type=0, epnum=0x83, devnum=2, data=b"abcdef", mmapped=True,
                            iso_descriptors=[(0, 0, 3), (0, 3, 3)]),
    ]  # fmt: skip
    (t,) = pair_transactions(_usbmon(records, mmapped=True))
    assert (t.transfer_type, t.actual_length, t.complete) == ("isochronous", 6, True)


def test_record_shorter_than_the_usbmon_header_names_the_frame() -> None:
    data = synth.pcap([(1.0, b"\0" * 40)], LINKTYPE_USB_LINUX)
    with pytest.raises(
        CaptureError, match="frame 1: usbmon record of 40 bytes is shorter than its 48-byte header"
    ):
        analyze(data)


def test_unsupported_link_type_names_it_and_the_frame() -> None:
    data = synth.pcap([(1.0, b"\0" * 60)], 105)
    with pytest.raises(CaptureError, match=r"frame 1: link type 105 \(unknown\) is neither usbmon"):
        analyze(data)


def test_garbage_in_a_usbmon_record_is_a_capture_error() -> None:
    bad = bytearray(synth.usbmon_record(urb_id=1, event="S", xfer_type=XFER_BULK, epnum=0x81, devnum=2))
    bad[8] = ord("X")
    with pytest.raises(CaptureError, match="frame 1: usbmon record has event type 0x58"):
        analyze(_usbmon([bytes(bad)]))


# --- USB/IP --------------------------------------------------------------------------------------------------------

Message = tuple[bool, bytes]  # (to server, wire bytes)


def _capture(
    messages: Sequence[Message], cuts: dict[bool, list[int]] | None = None, handshake: bool = True
) -> bytes:
    conn = synth.TcpConnection()
    frames = [(1.0 + i * 1e-3, f) for i, f in enumerate(conn.handshake())] if handshake else []
    offsets = {True: 0, False: 0}
    for to_server, msg in messages:
        start = offsets[to_server]
        offsets[to_server] += len(msg)
        local = [c - start for c in (cuts or {}).get(to_server, []) if start < c < start + len(msg)]
        for f in conn.send(to_server, msg, local):
            frames.append((1.0 + len(frames) * 1e-3, f))
    return synth.pcap(frames, LINKTYPE_ETHERNET)


UDEV = UsbDevice(path="/sys/devices/pci0000:00/usb1/1-1", busid="1-1", busnum=1, devnum=2, speed=3,
                 idVendor=0x1D6B, idProduct=0x0104, bcdDevice=0x0100)  # fmt: skip
CONFIG = bytes.fromhex("09022000010100803209040000020806500007058102000200070502020002 00".replace(" ", ""))


def _session() -> list[Message]:
    get_config = bytes.fromhex("8006000200002000")
    return [
        (True, pack(OpReqImport(busid="1-1"))),
        (False, pack(OpRepImport(udev=UDEV))),
        (True, pack(CmdSubmit(seqnum=1, devid=DEVID, direction=1, ep=0, transfer_buffer_length=32, setup=get_config))),
        (False, pack(RetSubmit(seqnum=1, actual_length=32, transfer_buffer=CONFIG))),
        (True, pack(CmdSubmit(seqnum=2, devid=DEVID, direction=0, ep=2, transfer_buffer_length=31,
                              transfer_buffer=_cbw(9, 512, bytes.fromhex("28 00 00000010 00 0001 00"))))),
        (False, pack(RetSubmit(seqnum=2, actual_length=31))),
        (True, pack(CmdSubmit(seqnum=3, devid=DEVID, direction=1, ep=1, transfer_buffer_length=512))),
        (False, pack(RetSubmit(seqnum=3, actual_length=512, transfer_buffer=bytes(512)))),
        (True, pack(CmdSubmit(seqnum=4, devid=DEVID, direction=1, ep=1, transfer_buffer_length=13))),
        (False, pack(RetSubmit(seqnum=4, actual_length=13, transfer_buffer=_csw(9)))),
        (True, pack(CmdSubmit(seqnum=5, devid=DEVID, direction=0, ep=2, transfer_buffer_length=31,
                              transfer_buffer=_cbw(10, 0, bytes(6), data_in=False)))),
        (False, pack(RetSubmit(seqnum=5, status=-32, actual_length=0))),
    ]  # fmt: skip


def _key(t: Transaction) -> tuple[object, ...]:
    return (
        t.kind,
        t.urb_id,
        t.device,
        t.endpoint,
        t.requested_length,
        t.status,
        t.actual_length,
        t.bot,
        t.scsi_opcode,
    )


def test_usbip_pairs_cmd_and_ret_submit_by_seqnum_and_knows_the_import() -> None:
    a = analyze(_capture(_session()))
    assert a.protocols == {"usbip"} and a.warnings == []
    imp, ctrl, cbw, data, csw, stalled = a.transactions
    assert (imp.kind, imp.busid, imp.status_text, imp.device) == ("import", "1-1", "ST_OK", "1:2")
    assert (ctrl.urb_id, ctrl.transfer_type, ctrl.actual_length, ctrl.connection) == (
        1, "control", 32, "10.0.0.2:40000 -> 10.0.0.1:3240",
    )  # fmt: skip
    assert (cbw.bot, cbw.scsi_name, cbw.busid, cbw.device) == ("CBW", "READ_10", "1-1", "1:2")
    # endpoint types were learnt from the configuration descriptor answer
    assert (data.transfer_type, data.endpoint, data.bot, data.actual_length) == ("bulk", 0x81, "data", 512)
    assert (csw.bot, csw.csw_status, csw.scsi_name) == ("CSW", 0, "READ_10")
    assert (stalled.status_text, stalled.failed) == ("-EPIPE", True)
    (read, tur) = a.scsi_commands
    assert (read.name, read.logical_block_address, read.blocks, read.csw_status, read.data_bytes) == (
        "READ_10",
        16,
        1,
        0,
        512,
    )
    assert (tur.name, tur.csw_status, tur.response_frame) == ("TEST_UNIT_READY", None, None)
    assert a.records == 12


def test_unlink_with_econnreset_closes_the_victim_and_unlink_after_completion_does_not() -> None:
    messages = [
        (True, pack(CmdSubmit(seqnum=1, devid=DEVID, direction=1, ep=1, transfer_buffer_length=64))),
        (True, pack(CmdUnlink(seqnum=2, devid=DEVID, unlink_seqnum=1))),
        (False, pack(RetUnlink(seqnum=2, status=-104))),
        (True, pack(CmdSubmit(seqnum=3, devid=DEVID, direction=1, ep=1, transfer_buffer_length=64))),
        (False, pack(RetSubmit(seqnum=3, actual_length=4, transfer_buffer=b"abcd"))),
        (True, pack(CmdUnlink(seqnum=4, devid=DEVID, unlink_seqnum=3))),
        (False, pack(RetUnlink(seqnum=4, status=0))),
    ]
    victim, unlink, done, late_unlink = pair_transactions(_capture(messages))
    assert (victim.unlinked, victim.status_text, victim.response_frame, victim.actual_length) == (
        True,
        "unlinked",
        6,
        0,
    )
    assert (unlink.kind, unlink.unlink_seqnum, unlink.status, unlink.endpoint) == ("unlink", 1, -104, 0x81)
    assert (done.unlinked, done.status, done.actual_length) == (False, 0, 4)
    assert (late_unlink.status, late_unlink.unlink_seqnum) == (0, 3)
    assert summarize([victim, done])["unlinked"] == 1


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_split_of_the_tcp_streams_pairs_the_same_transactions(data: st.DataObject) -> None:
    messages = _session()
    sizes = {True: sum(len(m) for d, m in messages if d), False: sum(len(m) for d, m in messages if not d)}
    cuts = {
        d: data.draw(st.lists(st.integers(1, sizes[d] - 1), max_size=20), label=str(d)) for d in (True, False)
    }
    whole = [_key(t) for t in pair_transactions(_capture(messages))]
    assert [_key(t) for t in pair_transactions(_capture(messages, cuts))] == whole


def test_retransmitted_and_reordered_segments_are_put_back_in_order() -> None:
    conn = synth.TcpConnection()
    frames = conn.handshake()
    msg = pack(
        CmdSubmit(
            seqnum=1,
            devid=DEVID,
            direction=0,
            ep=2,
            transfer_buffer_length=100,
            transfer_buffer=bytes(range(100)),
        )
    )
    a, b, c = conn.send(True, msg, [50, 100])
    frames += [a, c, b, b, a]  # c arrives before b; b and a are retransmitted
    frames += conn.send(False, pack(RetSubmit(seqnum=1, actual_length=100)))
    result = analyze(synth.pcap([(1.0 + i, f) for i, f in enumerate(frames)], LINKTYPE_ETHERNET))
    (t,) = result.transactions
    assert (t.requested_length, t.actual_length, t.frame, t.response_frame) == (100, 100, 6, 9)
    assert result.warnings == []


def test_capture_starting_mid_message_skips_to_the_next_message_and_warns() -> None:
    msgs = _session()[2:6]
    first = msgs[0][1]
    conn = synth.TcpConnection()
    frames = [(1.0, conn.frame(True, first[10:]))]  # the tail of a message whose start was not captured
    conn.seq[True] += len(first) - 10
    for d, m in msgs[1:]:
        frames += [(2.0, f) for f in conn.send(d, m)]
    a = analyze(synth.pcap(frames, LINKTYPE_ETHERNET))
    assert [t.urb_id for t in a.transactions] == [1, 2]
    assert a.transactions[0].frame is None  # its RET_SUBMIT answered a CMD_SUBMIT that was not captured
    assert any("skipped" in w and "began in the middle" in w for w in a.warnings)
    assert any("answers no CMD_SUBMIT" in w for w in a.warnings)


def test_garbage_in_a_synchronised_stream_names_the_frame_and_stream_offset() -> None:
    messages = [*_session()[2:4], (True, b"\x00\x00\x00\t" + bytes(44))]
    with pytest.raises(
        CaptureError,
        match=r"frame 6: 10\.0\.0\.2:40000 -> 10\.0\.0\.1:3240: bytes at stream offset 48 are not a USB/IP message",
    ):
        analyze(_capture(messages))


def test_op_message_after_urb_traffic_is_a_protocol_error() -> None:
    messages = [*_session()[2:4], (True, pack(OpReqImport(busid="1-1")))]
    with pytest.raises(CaptureError, match="OP message 0x8003 after the connection switched to URB traffic"):
        analyze(_capture(messages))


def test_tcp_segment_cut_by_the_snapshot_length_is_an_error() -> None:
    conn = synth.TcpConnection()
    frame = conn.frame(
        True,
        pack(
            CmdSubmit(
                seqnum=1,
                devid=DEVID,
                direction=0,
                ep=2,
                transfer_buffer_length=200,
                transfer_buffer=bytes(200),
            )
        ),
    )
    data = synth.pcap([(1.0, frame)], LINKTYPE_ETHERNET, snaplen=96)
    with pytest.raises(CaptureError, match=r"frame 1: TCP segment .* cut by the snapshot length"):
        analyze(data)


def test_capture_ending_inside_a_message_is_a_warning_not_an_error() -> None:
    messages = _session()[2:4]
    data = _capture([*messages[:1], (False, messages[1][1][:60])])
    a = analyze(data)
    assert len(a.transactions) == 1 and not a.transactions[0].complete
    assert any("ends inside a USB/IP message (60 bytes buffered)" in w for w in a.warnings)


def test_ip_capture_without_usbip_traffic_says_so() -> None:
    conn = synth.TcpConnection(server=("10.0.0.1", 80))
    a = analyze(synth.pcap([(1.0, f) for f in conn.send(True, b"GET / HTTP/1.1\r\n\r\n")], LINKTYPE_ETHERNET))
    assert a.transactions == [] and a.warnings == ["no USB/IP traffic: 1 IP frames, none on TCP port 3240"]


def test_other_ports_can_carry_usbip() -> None:
    conn = synth.TcpConnection(server=("10.0.0.1", 9999))
    frames = conn.send(
        True, pack(CmdSubmit(seqnum=1, devid=DEVID, direction=1, ep=1, transfer_buffer_length=8))
    )
    data = synth.pcap([(1.0, f) for f in frames], LINKTYPE_ETHERNET)
    assert pair_transactions(data) == []
    assert len(pair_transactions(data, ports=(9999,))) == 1


def test_fast_path_agrees_with_the_scapy_layers_on_the_same_capture(tmp_path: Path) -> None:
    path = tmp_path / "s.pcap"
    cuts = {True: [5, 90, 91, 200], False: [100, 400]}
    path.write_bytes(_capture(_session(), cuts))
    pending: dict[int, USBIP_CmdSubmit] = {}
    from_scapy = []
    for pkt in read_packets(path):
        if TCP not in pkt:
            continue
        for m in usbip_messages(pkt):
            if isinstance(m, USBIP_CmdSubmit):
                pending[m.seqnum] = m
            elif isinstance(m, USBIP_RetSubmit):
                cmd = pending.pop(m.seqnum)
                from_scapy.append(
                    (m.seqnum, cmd.endpoint_address, cmd.transfer_buffer_length, m.status, m.actual_length)
                )
    fast = [
        (t.urb_id, t.endpoint, t.requested_length, t.status, t.actual_length)
        for t in pair_transactions(path)
        if t.kind == "submit"
    ]
    assert fast == from_scapy


def test_a_scapy_packet_list_pairs_like_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.pcap"
    path.write_bytes(_capture(_session()))
    assert [_key(t) for t in pair_transactions(rdpcap(str(path)))] == [
        _key(t) for t in pair_transactions(path)
    ]
    usbmon = tmp_path / "m.pcap"
    usbmon.write_bytes(synth.usbmon_capture(2, ng=False))
    assert [_key(t) for t in pair_transactions(rdpcap(str(usbmon)))] == [
        _key(t) for t in pair_transactions(usbmon)
    ]


# --- summaries -------------------------------------------------------------------------------------------------------


def test_percentiles_interpolate_linearly_like_numpy() -> None:
    values = [float(v) for v in range(1, 11)]  # numpy.percentile(range(1, 11), [50, 90, 99]) = 5.5, 9.1, 9.91
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 90) == pytest.approx(9.1)
    assert percentile(values, 99) == pytest.approx(9.91)
    assert percentile([], 50) is None


def test_summary_counts_bytes_errors_and_latency() -> None:
    a = analyze(_capture(_session()))
    s = summarize(a.transactions, a.scsi_commands)
    assert (s["urbs"], s["completed"], s["pending"], s["errors"]) == (5, 5, 0, 1)
    assert s["errors_by_status"] == {"-EPIPE": 1}
    assert (s["bytes_in"], s["bytes_out"]) == (32 + 512 + 13, 31)
    assert s["latency"]["count"] == 5 and s["latency"]["p50"] == pytest.approx(1e-3, abs=1e-6)
    assert s["scsi"]["by_opcode"] == {"READ_10": 1, "TEST_UNIT_READY": 1}


def test_implausible_transfer_length_is_reported_instead_of_buffering_the_rest_of_the_capture() -> None:
    header = pack(CmdSubmit(seqnum=1, devid=DEVID, direction=1, ep=1, transfer_buffer_length=8))
    bogus = (
        header[:4] + header[4:12] + b"\0\0\0\0" + header[16:24] + struct.pack(">i", 0x7FFF0000) + header[28:]
    )
    with pytest.raises(
        CaptureError, match=r"frame 4: .*CMD_SUBMIT seqnum 1 at stream offset 0 announces 2147418112 bytes"
    ):
        analyze(_capture([(True, bogus + b"more")]))


def test_lenient_analysis_skips_only_the_connection_that_sent_garbage_and_pairs_the_others() -> None:
    good = synth.TcpConnection(client=("10.0.0.2", 40000))
    bad = synth.TcpConnection(client=("10.0.0.3", 40001))
    frames = [(1.0, f) for f in good.handshake() + bad.handshake()]
    frames += [(1.1, f) for f in bad.send(True, b"\xde\xad\xbe\xef" * 12)]
    for to_server, msg in _session():
        frames += [(1.2, f) for f in good.send(to_server, msg)]
    capture = synth.pcap(frames, LINKTYPE_ETHERNET)
    with pytest.raises(CaptureError, match=r"10\.0\.0\.3:40001 -> 10\.0\.0\.1:3240"):
        analyze(capture)
    lenient = analyze(capture, strict=False)
    alone = synth.TcpConnection(client=("10.0.0.2", 40000))
    alone_frames = [(1.0, f) for f in alone.handshake()]
    for to_server, msg in _session():
        alone_frames += [(1.2, f) for f in alone.send(to_server, msg)]
    expected = analyze(synth.pcap(alone_frames, LINKTYPE_ETHERNET)).transactions
    got = [
        t for t in lenient.transactions if t.device and "10.0.0.2" in str(t.device)
    ] or lenient.transactions
    assert [(t.kind, t.urb_id, t.status, t.actual_length) for t in got] == [
        (t.kind, t.urb_id, t.status, t.actual_length) for t in expected
    ]
    assert len(expected) >= 3
    assert any("10.0.0.3:40001" in w and "rest of this connection is skipped" in w for w in lenient.warnings)


def test_capture_cut_inside_its_last_block_is_an_error_strictly_and_analysed_up_to_the_cut_leniently() -> (
    None
):
    conn = synth.TcpConnection()
    frames = [(1.0, f) for f in conn.handshake()]
    for to_server, msg in _session():
        frames += [(1.2, f) for f in conn.send(to_server, msg)]
    whole = synth.pcapng(frames, LINKTYPE_ETHERNET)
    complete = analyze(whole).transactions
    cut = whole[:-7]  # the writer died inside the last enhanced packet block
    with pytest.raises(CaptureError, match="truncated"):
        analyze(cut)
    lenient = analyze(cut, strict=False)
    assert any("cut short" in w for w in lenient.warnings)
    assert [(t.kind, t.urb_id) for t in lenient.transactions] == [(t.kind, t.urb_id) for t in complete]
    assert sum(1 for t in lenient.transactions if t.complete) == sum(1 for t in complete if t.complete) - 1
