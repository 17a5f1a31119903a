"""USB/IP codec: round trips, golden byte layouts from the kernel's usbip_protocol.rst, and bad input."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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

from emulator.errors import VusbError
from emulator.usbip import codec
from emulator.usbip.codec import DEFAULT_LIMITS, Limits, pack, read_cmd_submit, read_ret_submit, unpack
from emulator.usbip.constants import (
    ECONNRESET,
    ST_NA,
    ST_NODEV,
    USB_SPEED_FULL,
    USBIP_DIR_IN,
    USBIP_DIR_OUT,
    USBIP_URB_DIR_IN,
)
from emulator.usbip.errors import (
    LimitExceededError,
    LocalFieldError,
    LocalLengthMismatchError,
    LocalProtocolError,
    ProtocolError,
    RemoteFieldError,
    RemoteLengthMismatchError,
    RemoteProtocolError,
    TrailingDataError,
    TruncatedMessageError,
    UnknownCommandError,
    VersionMismatchError,
)
from emulator.usbip.messages import (
    CmdSubmit,
    CmdUnlink,
    IsoPacketDescriptor,
    OpDevlistReplyExtra,
    OpRepDevlist,
    OpRepImport,
    OpReqDevlist,
    OpReqImport,
    RetSubmit,
    RetUnlink,
    UsbDevice,
    UsbInterface,
)


def hexbytes(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# ---------------------------------------------------------------------------------------------- round trips

any_message = st.one_of(
    cmd_submits(),
    cmd_unlinks,
    ret_unlinks,
    op_rep_devlists,
    op_rep_imports,
    op_req_devlists,
    op_req_imports,
    ret_submits_with_direction().map(lambda pair: pair[0]),
)


@settings(max_examples=300)
@given(any_message)
def test_unpack_of_pack_returns_the_same_message_for_every_type(message):
    assert unpack(pack(message)) == message


@settings(max_examples=200)
@given(ret_submits_with_direction())
def test_ret_submit_round_trips_with_its_cmd_direction_given_or_inferred(pair):
    ret, direction = pair
    raw = pack(ret)
    assert unpack(raw, direction=direction) == ret
    assert unpack(raw) == ret
    payload = ret.actual_length if direction == USBIP_DIR_IN else 0
    assert len(raw) == 48 + payload + 16 * max(ret.number_of_packets, 0)


@settings(max_examples=200)
@given(cmd_submits())
def test_cmd_submit_carries_the_buffer_only_when_out_and_iso_descriptors_after_it(cmd):
    raw = pack(cmd)
    payload = cmd.transfer_buffer_length if cmd.direction == USBIP_DIR_OUT else 0
    assert len(raw) == 48 + payload + 16 * max(cmd.number_of_packets, 0)
    assert raw[48 : 48 + payload] == cmd.transfer_buffer


@settings(max_examples=200)
@given(any_message, st.binary(max_size=60))
def test_incremental_reader_needs_exactly_the_message_and_leaves_what_follows(message, tail):
    raw = pack(message)
    reader = codec.READERS[type(message)]

    def direction_of(seqnum):
        return USBIP_DIR_IN if isinstance(message, RetSubmit) and message.transfer_buffer else USBIP_DIR_OUT

    for cut in range(len(raw)):
        need = reader(raw[:cut], 0, 0, DEFAULT_LIMITS, direction_of)
        assert isinstance(need, int) and cut < need <= len(raw)
    decoded, consumed = reader(raw + tail, 0, 0, DEFAULT_LIMITS, direction_of)
    assert decoded == message and consumed == len(raw)


@pytest.mark.parametrize("packets_hex, packets", [("ffffffff", -1), ("00000000", 0)])
def test_non_iso_number_of_packets_minus_one_and_zero_both_round_trip_byte_exact(packets_hex, packets):
    raw = hexbytes(
        f"00000001 00000001 00010002 00000001 00000002 00000200 00000200 00000000 {packets_hex}"
        "00000000 0000000000000000"
    )
    cmd = unpack(raw)
    assert isinstance(cmd, CmdSubmit) and cmd.number_of_packets == packets and not cmd.is_iso
    assert pack(cmd) == raw
    ret_raw = hexbytes(
        f"00000003 00000001 00000000 00000000 00000000 00000000 00000000 00000000 {packets_hex}"
        "00000000 0000000000000000"
    )
    assert pack(unpack(ret_raw)) == ret_raw


# ---------------------------------------------------------------------------------------------- golden vectors
# From the EXAMPLE section of Documentation/usb/usbip_protocol.rst ("captured from wire with HID payload").

HID_PAYLOAD_OUT = "ffffffff860008a784ce5ae2123763" + "00" * 49
HID_PAYLOAD_IN = "ffffffff860011a784ce5ae2123763612891b1020100000400" + "00" * 39
CMD_INTR_IN = (
    "00000001 00000d05 0001000f 00000001 00000001 00000200 00000040 ffffffff 00000000 00000004 "
    "00000000 00000000"
)
CMD_INTR_OUT = (
    "00000001 00000d06 0001000f 00000000 00000001 00000000 00000040 ffffffff 00000000 00000004 "
    "00000000 00000000" + HID_PAYLOAD_OUT
)
RET_INTR_OUT = (
    "00000003 00000d06 00000000 00000000 00000000 00000000 00000040 ffffffff 00000000 00000000 "
    "00000000 00000000"
)
RET_INTR_IN = (
    "00000003 00000d05 00000000 00000000 00000000 00000000 00000040 ffffffff 00000000 00000000 "
    "00000000 00000000" + HID_PAYLOAD_IN
)


def test_kernel_doc_example_cmd_intr_in_decodes_field_by_field_and_reencodes_identically():
    raw = hexbytes(CMD_INTR_IN)
    cmd = unpack(raw)
    assert cmd == CmdSubmit(
        seqnum=0xD05,
        devid=0x1000F,
        direction=USBIP_DIR_IN,
        ep=1,
        transfer_flags=USBIP_URB_DIR_IN,
        transfer_buffer_length=0x40,
        start_frame=-1,
        number_of_packets=0,
        interval=4,
        setup=bytes(8),
    )
    assert pack(cmd) == raw


def test_kernel_doc_example_cmd_intr_out_carries_its_64_byte_buffer():
    raw = hexbytes(CMD_INTR_OUT)
    assert len(raw) == 48 + 64
    cmd = unpack(raw)
    assert isinstance(cmd, CmdSubmit)
    assert cmd.direction == USBIP_DIR_OUT and cmd.seqnum == 0xD06 and cmd.transfer_buffer_length == 64
    assert cmd.transfer_buffer == hexbytes(HID_PAYLOAD_OUT)
    assert pack(cmd) == raw


def test_kernel_doc_example_ret_intr_out_and_in_decode_with_the_cmd_direction():
    ret_out = unpack(hexbytes(RET_INTR_OUT), direction=USBIP_DIR_OUT)
    assert ret_out == RetSubmit(seqnum=0xD06, actual_length=64, start_frame=-1)
    assert pack(ret_out) == hexbytes(RET_INTR_OUT)
    ret_in = unpack(hexbytes(RET_INTR_IN), direction=USBIP_DIR_IN)
    assert ret_in == RetSubmit(
        seqnum=0xD05, actual_length=64, start_frame=-1, transfer_buffer=hexbytes(HID_PAYLOAD_IN)
    )
    assert pack(ret_in) == hexbytes(RET_INTR_IN)


def test_op_req_devlist_is_version_code_and_zero_status():
    assert pack(OpReqDevlist()) == hexbytes("0111 8005 00000000")
    assert unpack(hexbytes("0111 8005 00000000")) == OpReqDevlist()


def test_op_req_import_is_op_common_then_busid_in_32_zero_filled_bytes():
    raw = hexbytes("0111 8003 00000000") + b"3-2".ljust(32, b"\0")
    assert pack(OpReqImport(busid="3-2")) == raw
    assert unpack(raw) == OpReqImport(busid="3-2")


@pytest.mark.parametrize("status", [ST_NA, ST_NODEV])
def test_failed_op_rep_import_is_only_the_8_byte_op_common(status):
    raw = hexbytes(f"0111 0003 {status:08x}")
    assert pack(OpRepImport(status=status)) == raw
    assert unpack(raw) == OpRepImport(status=status, udev=None)


PATH = "/sys/devices/pci0000:00/0000:00:1d.1/usb3/3-2"
DEVICE = UsbDevice(
    path=PATH,
    busid="3-2",
    busnum=3,
    devnum=2,
    speed=USB_SPEED_FULL,
    idVendor=0x046D,
    idProduct=0xC52B,
    bcdDevice=0x1201,
    bDeviceClass=0,
    bDeviceSubClass=0,
    bDeviceProtocol=0,
    bConfigurationValue=1,
    bNumConfigurations=1,
    bNumInterfaces=1,
)


def _device_record_hex() -> str:
    return (
        PATH.encode().ljust(256, b"\0").hex()
        + b"3-2".ljust(32, b"\0").hex()
        + "00000003 00000002 00000002 046d c52b 1201 00 00 00 01 01 01"
    )


def test_op_rep_devlist_matches_the_offsets_of_the_kernel_table():
    second = UsbDevice(
        path="/sys/x/1-1",
        busid="1-1",
        busnum=1,
        devnum=4,
        speed=3,
        idVendor=1,
        idProduct=2,
        bcdDevice=3,
        bNumInterfaces=0,
    )
    message = OpRepDevlist(
        devices=(
            OpDevlistReplyExtra(
                udev=DEVICE,
                uinf=(UsbInterface(bInterfaceClass=3, bInterfaceSubClass=1, bInterfaceProtocol=2),),
            ),
            OpDevlistReplyExtra(udev=second, uinf=()),
        )
    )
    raw = pack(message)
    expected_first = hexbytes("0111 0005 00000000 00000002" + _device_record_hex() + "03 01 02 00")
    assert raw[: len(expected_first)] == expected_first
    # Offsets straight from the table: path 0x0C, busid 0x10C, busnum 0x12C, devnum 0x130, speed 0x134,
    # idVendor 0x138, idProduct 0x13A, bcdDevice 0x13C, classes 0x13E..0x140, bConfigurationValue 0x141,
    # bNumConfigurations 0x142, bNumInterfaces 0x143, first interface 0x144.
    assert raw[0x0C : 0x0C + len(PATH)] == PATH.encode()
    assert raw[0x10C : 0x10C + 4] == b"3-2\0"
    assert raw[0x12C:0x130] == b"\0\0\0\x03" and raw[0x130:0x134] == b"\0\0\0\x02"
    assert raw[0x134:0x138] == b"\0\0\0\x02"
    assert raw[0x138:0x13E] == hexbytes("046d c52b 1201")
    assert raw[0x141:0x144] == b"\x01\x01\x01"
    assert raw[0x144:0x148] == b"\x03\x01\x02\x00"
    # "The second exported USB device starts at i=1": 0xC + i*0x138 + m_(i-1)*4.
    second_start = 0xC + 1 * 0x138 + 1 * 4
    assert raw[second_start : second_start + 10] == b"/sys/x/1-1"
    assert len(raw) == second_start + 0x138
    assert unpack(raw) == message


def test_op_rep_import_matches_the_offsets_of_the_kernel_table():
    raw = pack(OpRepImport(udev=DEVICE))
    assert raw == hexbytes("0111 0003 00000000" + _device_record_hex())
    assert len(raw) == 0x140
    assert raw[0x108:0x10C] == b"3-2\0" and raw[0x128:0x12C] == b"\0\0\0\x03" and raw[0x13F] == 1
    assert unpack(raw) == OpRepImport(udev=DEVICE)


def test_cmd_unlink_and_ret_unlink_are_48_bytes_with_zero_padding():
    cmd = CmdUnlink(seqnum=0x10, devid=0x10002, unlink_seqnum=0x0F)
    assert pack(cmd) == hexbytes("00000002 00000010 00010002 00000000 00000000 0000000f") + bytes(24)
    ret = RetUnlink(seqnum=0x10, status=-ECONNRESET)
    assert pack(ret) == hexbytes("00000004 00000010 00000000 00000000 00000000 ffffff98") + bytes(24)
    assert unpack(pack(cmd)) == cmd and unpack(pack(ret)) == ret


def test_iso_in_ret_submit_sends_packets_back_to_back_then_descriptors():
    isos = (
        IsoPacketDescriptor(offset=0, length=8, actual_length=3, status=0),
        IsoPacketDescriptor(offset=8, length=8, actual_length=2, status=-18),
    )
    ret = RetSubmit(
        seqnum=7,
        actual_length=5,
        start_frame=100,
        number_of_packets=2,
        transfer_buffer=b"abcde",
        iso_packet_descriptors=isos,
    )
    raw = pack(ret)
    assert raw == hexbytes(
        "00000003 00000007 00000000 00000000 00000000 00000000 00000005 00000064 00000002 00000000"
        "0000000000000000"
        + b"abcde".hex()
        + "00000000 00000008 00000003 00000000"
        + "00000008 00000008 00000002 ffffffee"
    )
    assert unpack(raw, direction=USBIP_DIR_IN) == ret


def test_setup_packet_passes_through_raw_little_endian_bytes():
    setup = hexbytes("8006 0001 0000 1200")  # GET_DESCRIPTOR(DEVICE), wLength 18, little-endian inside
    cmd = CmdSubmit(seqnum=1, devid=1, direction=USBIP_DIR_IN, ep=0, transfer_buffer_length=18, setup=setup)
    assert pack(cmd)[40:48] == setup
    assert unpack(pack(cmd)).setup == setup


def test_header_basic_is_the_first_20_bytes():
    header = codec.unpack_header_basic(hexbytes(CMD_INTR_IN))
    assert (header.command, header.seqnum, header.devid, header.direction, header.ep) == (
        1,
        0xD05,
        0x1000F,
        1,
        1,
    )


# ---------------------------------------------------------------------------------------------- remote errors


def cmd_raw(**fields) -> bytearray:
    values = dict(
        command=1,
        seqnum=9,
        devid=0x10002,
        direction=0,
        ep=1,
        transfer_flags=0,
        transfer_buffer_length=0,
        start_frame=0,
        number_of_packets=0,
        interval=0,
    )
    values.update(fields)
    return bytearray(struct.pack(">6I4i8s", *values.values(), bytes(8)))


def ret_raw(**fields) -> bytearray:
    values = dict(
        command=3,
        seqnum=9,
        devid=0,
        direction=0,
        ep=0,
        status=0,
        actual_length=0,
        start_frame=0,
        number_of_packets=0,
        error_count=0,
    )
    values.update(fields)
    return bytearray(struct.pack(">5I5i8x", *values.values()))


def test_unknown_urb_command_raises_unknown_command_error_naming_the_command_field():
    with pytest.raises(UnknownCommandError, match="command 0x00000009") as info:
        unpack(cmd_raw(command=9))
    assert info.value.field == "command" and info.value.offset == 0


def test_unknown_op_code_raises_unknown_command_error_and_names_the_kernel_op():
    with pytest.raises(UnknownCommandError, match="OP_REQ_DEVINFO") as info:
        unpack(hexbytes("0111 8002 00000000"))
    assert info.value.field == "code" and info.value.offset == 2
    with pytest.raises(UnknownCommandError, match="0x8042"):
        unpack(hexbytes("0111 8042 00000000"))


def test_wrong_version_raises_version_mismatch_naming_both_versions():
    with pytest.raises(VersionMismatchError, match=r"0x0106.*0x0111") as info:
        unpack(hexbytes("0106 8005 00000000"))
    assert info.value.field == "version"


def test_truncated_bytes_raise_truncated_message_error_saying_how_many_are_needed():
    with pytest.raises(TruncatedMessageError, match=r"USBIP_CMD_SUBMIT: 47 bytes given.*at least 48"):
        unpack(hexbytes(CMD_INTR_IN)[:47])
    with pytest.raises(TruncatedMessageError, match="at least 112"):
        unpack(hexbytes(CMD_INTR_OUT)[:100])
    with pytest.raises(TruncatedMessageError):
        unpack(b"\x01")


def test_extra_bytes_after_one_message_raise_trailing_data_error():
    with pytest.raises(TrailingDataError, match="3 bytes after the end"):
        unpack(hexbytes(CMD_INTR_IN) + b"abc")


def test_direction_other_than_in_or_out_is_a_remote_field_error_at_byte_12():
    with pytest.raises(RemoteFieldError, match="direction 2") as info:
        unpack(cmd_raw(direction=2))
    assert (info.value.field, info.value.offset, info.value.seqnum) == ("direction", 12, 9)


def test_endpoint_above_15_is_a_remote_field_error():
    with pytest.raises(RemoteFieldError, match="ep 16") as info:
        unpack(cmd_raw(ep=16))
    assert info.value.field == "ep" and info.value.offset == 16


def test_negative_transfer_buffer_length_is_a_remote_field_error():
    with pytest.raises(RemoteFieldError, match="transfer_buffer_length -1") as info:
        unpack(cmd_raw(transfer_buffer_length=-1))
    assert info.value.field == "transfer_buffer_length" and info.value.offset == 24


def test_number_of_packets_below_minus_one_is_a_remote_field_error():
    with pytest.raises(RemoteFieldError, match="number_of_packets -2") as info:
        unpack(cmd_raw(number_of_packets=-2))
    assert info.value.field == "number_of_packets"
    with pytest.raises(RemoteFieldError, match="number_of_packets -5"):
        unpack(ret_raw(number_of_packets=-5))


def test_transfer_buffer_length_above_the_cap_is_refused_from_the_header_alone():
    header = bytes(cmd_raw(transfer_buffer_length=1 << 30))  # 1 GiB announced, no payload sent
    with pytest.raises(LimitExceededError, match="max_transfer_buffer_length") as info:
        read_cmd_submit(header, 0, 1000, DEFAULT_LIMITS)
    assert info.value.field == "transfer_buffer_length" and info.value.offset == 1024
    small = Limits(max_transfer_buffer_length=64)
    assert read_cmd_submit(bytes(cmd_raw(transfer_buffer_length=64)), 0, 0, small) == 48 + 64
    with pytest.raises(LimitExceededError):
        read_cmd_submit(bytes(cmd_raw(transfer_buffer_length=65)), 0, 0, small)


def test_actual_length_above_the_cap_or_negative_is_refused():
    with pytest.raises(LimitExceededError, match="actual_length") as info:
        read_ret_submit(bytes(ret_raw(actual_length=1 << 30)), 0, 0, DEFAULT_LIMITS, lambda s: USBIP_DIR_IN)
    assert info.value.field == "actual_length"
    with pytest.raises(RemoteFieldError, match="actual_length -3"):
        unpack(ret_raw(actual_length=-3))


def test_iso_packet_count_above_the_cap_is_refused():
    with pytest.raises(LimitExceededError, match="number_of_packets 1025") as info:
        unpack(cmd_raw(number_of_packets=1025))
    assert info.value.field == "number_of_packets"
    with pytest.raises(LimitExceededError, match="number_of_packets 5"):
        read_ret_submit(
            bytes(ret_raw(number_of_packets=5)),
            0,
            0,
            Limits(max_number_of_packets=4),
            lambda s: USBIP_DIR_OUT,
        )


def test_iso_ret_whose_packet_lengths_do_not_add_up_is_a_length_mismatch():
    raw = ret_raw(actual_length=4, number_of_packets=1) + struct.pack(">3Ii", 0, 8, 3, 0)
    with pytest.raises(RemoteLengthMismatchError, match="add up to 3, not to actual_length 4") as info:
        unpack(raw, direction=USBIP_DIR_OUT)
    assert info.value.field == "actual_length"


def test_devlist_device_count_above_the_cap_is_refused_before_reading_devices():
    raw = hexbytes("0111 0005 00000000 00010000")  # 65536 devices announced, none sent
    with pytest.raises(LimitExceededError, match="ndev 65536") as info:
        codec.read_op_rep_devlist(raw, 0, 0, DEFAULT_LIMITS)
    assert info.value.field == "ndev" and info.value.offset == 8


def test_devlist_interface_count_above_the_cap_is_refused():
    record = bytearray(hexbytes("0111 0005 00000000 00000001" + _device_record_hex()))
    record[-1] = 200
    with pytest.raises(LimitExceededError, match="bNumInterfaces 200") as info:
        codec.read_op_rep_devlist(bytes(record), 0, 0, DEFAULT_LIMITS)
    assert info.value.field == "bNumInterfaces" and info.value.offset == 12 + 311


def test_busid_without_terminating_nul_is_a_remote_field_error():
    with pytest.raises(RemoteFieldError, match="busid fills all 32 bytes") as info:
        unpack(hexbytes("0111 8003 00000000") + b"x" * 32)
    assert info.value.field == "busid" and info.value.offset == 8


def test_path_without_terminating_nul_is_a_remote_field_error():
    raw = bytearray(pack(OpRepImport(udev=DEVICE)))
    raw[8 : 8 + 256] = b"p" * 256
    with pytest.raises(RemoteFieldError, match="path") as info:
        unpack(raw)
    assert info.value.field == "path" and info.value.offset == 8


def test_request_with_non_zero_status_is_a_remote_field_error():
    with pytest.raises(RemoteFieldError, match="request status 0x1") as info:
        unpack(hexbytes("0111 8005 00000001"))
    assert info.value.field == "status" and info.value.offset == 4


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_decode_or_raise_a_protocol_error_and_nothing_else(data):
    try:
        message = unpack(data)
    except ProtocolError as error:
        assert isinstance(error, RemoteProtocolError) and isinstance(error, VusbError)
        assert str(error)
    else:
        assert pack(message)  # whatever decoded can be sent again


@settings(max_examples=200)
@given(any_message, st.data())
def test_corrupting_one_byte_of_a_valid_message_never_escapes_protocol_error(message, data):
    raw = bytearray(pack(message))
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ProtocolError):  # anything else escaping fails the test
        unpack(raw)


# ---------------------------------------------------------------------------------------------- local errors


def test_out_buffer_shorter_than_transfer_buffer_length_is_a_local_length_mismatch():
    cmd = CmdSubmit(
        seqnum=1, devid=1, direction=USBIP_DIR_OUT, ep=2, transfer_buffer_length=10, transfer_buffer=b"12345"
    )
    with pytest.raises(
        LocalLengthMismatchError, match="holds 5 bytes, transfer_buffer_length says 10"
    ) as info:
        pack(cmd)
    assert info.value.field == "transfer_buffer" and info.value.seqnum == 1


def test_in_cmd_submit_with_data_is_a_local_length_mismatch():
    cmd = CmdSubmit(
        seqnum=1, devid=1, direction=USBIP_DIR_IN, ep=2, transfer_buffer_length=3, transfer_buffer=b"abc"
    )
    with pytest.raises(LocalLengthMismatchError, match="IN CMD_SUBMIT carries no data"):
        pack(cmd)


def test_ret_submit_buffer_not_matching_actual_length_is_a_local_length_mismatch():
    with pytest.raises(LocalLengthMismatchError, match="actual_length says 4") as info:
        pack(RetSubmit(seqnum=3, actual_length=4, transfer_buffer=b"abc"))
    assert info.value.field == "transfer_buffer"


@pytest.mark.parametrize(
    "message, field",
    [
        (CmdSubmit(seqnum=1 << 32, devid=1, direction=0, ep=0), "seqnum"),
        (CmdSubmit(seqnum=1, devid=-1, direction=0, ep=0), "devid"),
        (CmdSubmit(seqnum=1, devid=1, direction=5, ep=0), "direction"),
        (CmdSubmit(seqnum=1, devid=1, direction=0, ep=16), "ep"),
        (CmdSubmit(seqnum=1, devid=1, direction=0, ep=0, interval=1 << 31), "interval"),
        (CmdSubmit(seqnum=1, devid=1, direction=0, ep=0, setup=b"1234567"), "setup"),
        (CmdSubmit(seqnum=1, devid=1, direction=0, ep=0, number_of_packets=-7), "number_of_packets"),
        (RetSubmit(seqnum=1, status=1 << 31), "status"),
        (RetSubmit(seqnum=1, actual_length=-1), "actual_length"),
        (CmdUnlink(seqnum=1, unlink_seqnum=-1), "unlink_seqnum"),
        (RetUnlink(seqnum=1, ep="1"), "ep"),
        (OpReqImport(busid="x" * 32), "busid"),
        (OpReqImport(busid="a\0b"), "busid"),
        (OpRepImport(status=0), "udev"),
        (OpRepImport(status=ST_NA, udev=DEVICE), "udev"),
        (OpRepImport(status=-1), "status"),
        (
            OpRepImport(
                udev=UsbDevice(
                    path="p", busid="b", busnum=1, devnum=1, speed=1, idVendor=70000, idProduct=1, bcdDevice=1
                )
            ),
            "udev.idVendor",
        ),
        (OpRepDevlist(status=ST_NA, devices=(OpDevlistReplyExtra(udev=DEVICE),)), "devices"),
        (
            RetSubmit(
                seqnum=1,
                actual_length=1,
                number_of_packets=1,
                transfer_buffer=b"x",
                iso_packet_descriptors=(IsoPacketDescriptor(offset=-1, length=1, actual_length=1),),
            ),
            "iso_packet_descriptors[0].offset",
        ),
    ],
)
def test_unsendable_field_values_raise_local_field_error_naming_the_field(message, field):
    with pytest.raises(LocalFieldError) as info:
        pack(message)
    assert info.value.field == field
    assert field.split(".")[-1].split("[")[0] in str(info.value)


def test_iso_descriptor_count_not_matching_number_of_packets_is_a_local_length_mismatch():
    cmd = CmdSubmit(
        seqnum=1,
        devid=1,
        direction=USBIP_DIR_IN,
        ep=3,
        number_of_packets=2,
        iso_packet_descriptors=(IsoPacketDescriptor(offset=0, length=8),),
    )
    with pytest.raises(LocalLengthMismatchError, match="announces 2 iso packet descriptors, 1 given"):
        pack(cmd)


def test_devlist_device_whose_bnuminterfaces_disagrees_with_its_list_is_a_local_length_mismatch():
    message = OpRepDevlist(devices=(OpDevlistReplyExtra(udev=DEVICE, uinf=()),))
    with pytest.raises(LocalLengthMismatchError, match="bNumInterfaces 1 but lists 0") as info:
        pack(message)
    assert info.value.field == "devices[0].uinf"


def test_packing_something_that_is_not_a_message_is_a_type_error():
    with pytest.raises(TypeError, match="not a USB/IP message"):
        pack("hello")  # type: ignore[arg-type]


def test_local_and_remote_errors_are_both_vusb_errors():
    assert issubclass(LocalProtocolError, VusbError) and issubclass(RemoteProtocolError, VusbError)
    assert not issubclass(LocalFieldError, RemoteProtocolError)


@given(any_message)
def test_pack_iov_joined_equals_pack_and_keeps_the_payload_uncopied(message):
    from emulator.usbip.codec import pack_iov

    iov = pack_iov(message)
    assert b"".join(iov) == pack(message)
    payload = getattr(message, "transfer_buffer", b"")
    if payload and not getattr(message, "iso_packet_descriptors", ()):
        assert iov[1] is payload


@given(st.integers(0, 0xFFFFFFFF), st.integers(-(1 << 31), (1 << 31) - 1), st.integers(0, (1 << 31) - 1))
def test_ret_submit_header_is_pack_iov_of_the_message(seqnum, status, actual_length):
    """The server's per-URB header packer writes the bytes the message packer writes."""
    ret = RetSubmit(seqnum=seqnum, status=status, actual_length=actual_length)
    assert codec.ret_submit_header(seqnum, status, actual_length) == codec.pack_iov(ret)[0]
