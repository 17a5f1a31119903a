"""captures.reader: pcap and pcapng containers, both byte orders, timestamp resolutions, and clear errors."""

from __future__ import annotations

import struct

import pytest

from captures import synth
from captures.errors import CaptureError
from captures.reader import LINKTYPE_ETHERNET, LINKTYPE_USB_LINUX, iter_frames, load
from emulator.errors import VusbError

FRAMES = [(1.5, b"\x01" * 20), (2.25, b"\x02" * 33), (3.000001, b"\x03" * 7)]


def _payloads(data: bytes) -> list[tuple[int, int, float, bytes, bool]]:
    return [
        (n, lt, ts, buf[off : off + cap], be) for n, lt, ts, buf, off, cap, _orig, be in iter_frames(data)
    ]


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("nanoseconds", [False, True])
def test_pcap_frames_come_back_with_numbers_timestamps_and_bytes(big_endian: bool, nanoseconds: bool) -> None:
    data = synth.pcap(FRAMES, LINKTYPE_USB_LINUX, big_endian=big_endian, nanoseconds=nanoseconds)
    got = _payloads(data)
    assert [g[0] for g in got] == [1, 2, 3]
    assert all(g[1] == LINKTYPE_USB_LINUX for g in got)
    assert [g[3] for g in got] == [f[1] for f in FRAMES]
    assert [g[2] for g in got] == pytest.approx([f[0] for f in FRAMES], abs=1e-6)
    assert all(g[4] is big_endian for g in got)


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("tsresol", [6, 9, 3])
def test_pcapng_frames_honour_section_byte_order_and_if_tsresol(big_endian: bool, tsresol: int) -> None:
    data = synth.pcapng(FRAMES, LINKTYPE_ETHERNET, big_endian=big_endian, tsresol=tsresol)
    got = _payloads(data)
    assert [g[3] for g in got] == [f[1] for f in FRAMES]
    assert [g[2] for g in got] == pytest.approx([f[0] for f in FRAMES], abs=10.0**-tsresol)
    assert all(g[1] == LINKTYPE_ETHERNET and g[4] is big_endian for g in got)


def test_pcapng_skips_blocks_that_carry_no_packet() -> None:
    data = synth.pcapng(FRAMES[:1], LINKTYPE_ETHERNET)
    # a Name Resolution Block (type 4) with only the end-of-records option, between IDB and EPB
    nrb = struct.pack("<II", 4, 16) + struct.pack("<HH", 0, 0) + struct.pack("<I", 16)
    shb_len = struct.unpack_from("<I", data, 4)[0]
    idb_len = struct.unpack_from("<I", data, shb_len + 4)[0]
    cut = shb_len + idb_len
    data = data[:cut] + nrb + data[cut:]
    assert [g[3] for g in _payloads(data)] == [FRAMES[0][1]]


def test_simple_packet_block_is_read() -> None:
    data = synth.pcapng([], LINKTYPE_ETHERNET)
    body = struct.pack("<I", 5) + b"hello" + b"\0\0\0"
    data += struct.pack("<II", 3, 12 + len(body)) + body + struct.pack("<I", 12 + len(body))
    assert [g[3] for g in _payloads(data)] == [b"hello"]


def test_empty_file_is_a_capture_error() -> None:
    with pytest.raises(CaptureError, match="empty file"):
        list(iter_frames(b""))


def test_garbage_is_a_capture_error_that_shows_the_first_bytes() -> None:
    with pytest.raises(CaptureError, match=r"not a pcap or pcapng capture .*47 45 54 20"):
        list(iter_frames(b"GET / HTTP/1.1\r\n"))


def test_truncated_pcap_record_names_its_frame() -> None:
    data = synth.pcap(FRAMES, LINKTYPE_USB_LINUX)
    with pytest.raises(CaptureError, match=r"frame 3: pcap record at byte \d+ is truncated") as info:
        list(iter_frames(data[:-3]))
    assert info.value.frame == 3


def test_truncated_pcap_record_header_names_its_frame() -> None:
    data = synth.pcap(FRAMES[:1], LINKTYPE_USB_LINUX) + b"\0" * 5
    with pytest.raises(CaptureError, match=r"frame 2: pcap record header at byte \d+ is truncated"):
        list(iter_frames(data))


def test_truncated_pcapng_block_names_the_frame_it_was_going_to_be() -> None:
    data = synth.pcapng(FRAMES, LINKTYPE_ETHERNET)
    with pytest.raises(CaptureError, match=r"frame 3: pcapng block at byte \d+ is truncated") as info:
        list(iter_frames(data[:-10]))
    assert isinstance(info.value, VusbError)


def test_pcapng_block_with_bad_length_is_rejected() -> None:
    data = bytearray(synth.pcapng(FRAMES[:1], LINKTYPE_ETHERNET))
    last = len(data) - struct.unpack_from("<I", data, len(data) - 4)[0]
    struct.pack_into("<I", data, last + 4, 13)
    with pytest.raises(CaptureError, match="invalid length 13"):
        list(iter_frames(bytes(data)))


def test_enhanced_packet_block_without_its_interface_is_rejected() -> None:
    data = bytearray(synth.pcapng(FRAMES[:1], LINKTYPE_ETHERNET))
    last = len(data) - struct.unpack_from("<I", data, len(data) - 4)[0]
    struct.pack_into("<I", data, last + 8, 7)  # interface id 7
    with pytest.raises(CaptureError, match=r"frame 1: .*names interface 7"):
        list(iter_frames(bytes(data)))


def test_pcapng_bad_byte_order_magic_is_rejected() -> None:
    data = bytearray(synth.pcapng(FRAMES[:1], LINKTYPE_ETHERNET))
    data[8:12] = b"\xde\xad\xbe\xef"
    with pytest.raises(CaptureError, match="bad byte-order magic"):
        list(iter_frames(bytes(data)))


def test_load_of_a_missing_file_is_a_capture_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CaptureError, match="cannot read capture"):
        load(tmp_path / "nope.pcap")
