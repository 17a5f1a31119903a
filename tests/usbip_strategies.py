"""Hypothesis strategies for valid USB/IP messages, shared by tests/test_usbip_*.py.

Every strategy yields a message the wire can carry (ranges, payload lengths, iso sums), so
`unpack(pack(m)) == m` must hold for each of them.
"""

from __future__ import annotations

from hypothesis import strategies as st

from emulator.usbip.constants import USBIP_DIR_IN, USBIP_DIR_OUT
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

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
s32 = st.integers(-(2**31), 2**31 - 1)
directions = st.sampled_from([USBIP_DIR_OUT, USBIP_DIR_IN])
non_iso_packets = st.sampled_from([0, -1])


def c_string(max_bytes: int) -> st.SearchStrategy[str]:
    """Text that encodes to at most `max_bytes` UTF-8 bytes without NUL (fits a fixed char[] field)."""
    chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")
    return st.text(chars, max_size=max_bytes).filter(lambda s: len(s.encode()) <= max_bytes)


def iso_descriptors(
    count: int, actual_lengths: list[int] | None = None
) -> st.SearchStrategy[tuple[IsoPacketDescriptor, ...]]:
    if actual_lengths is None:
        actual = st.lists(st.just(0), min_size=count, max_size=count)
    else:
        actual = st.just(actual_lengths)
    return actual.flatmap(
        lambda lengths: st.tuples(
            *(
                st.builds(IsoPacketDescriptor, offset=u32, length=u32, actual_length=st.just(n), status=s32)
                for n in lengths
            )
        )
    )


@st.composite
def cmd_submits(draw: st.DrawFn, *, devid: int | None = None) -> CmdSubmit:
    direction = draw(directions)
    iso = draw(st.booleans())
    number_of_packets = draw(st.integers(1, 6)) if iso else draw(non_iso_packets)
    if direction == USBIP_DIR_OUT:
        transfer_buffer = draw(st.binary(max_size=700))
        transfer_buffer_length = len(transfer_buffer)
    else:
        transfer_buffer = b""
        transfer_buffer_length = draw(st.integers(0, 1 << 20))
    isos = draw(iso_descriptors(number_of_packets)) if iso else ()
    return CmdSubmit(
        seqnum=draw(u32),
        devid=draw(u32) if devid is None else devid,
        direction=direction,
        ep=draw(st.integers(0, 15)),
        transfer_flags=draw(u32),
        transfer_buffer_length=transfer_buffer_length,
        start_frame=draw(s32),
        number_of_packets=number_of_packets,
        interval=draw(s32),
        setup=draw(st.binary(min_size=8, max_size=8)),
        transfer_buffer=transfer_buffer,
        iso_packet_descriptors=isos,
    )


@st.composite
def ret_submits_with_direction(draw: st.DrawFn) -> tuple[RetSubmit, int]:
    """A RET_SUBMIT and the direction of the CMD_SUBMIT it answers."""
    direction = draw(directions)
    iso = draw(st.booleans())
    if iso:
        lengths = draw(st.lists(st.integers(0, 200), min_size=1, max_size=6))
        number_of_packets = len(lengths)
        actual_length = sum(lengths)
        isos = draw(iso_descriptors(number_of_packets, lengths))
    else:
        number_of_packets = draw(non_iso_packets)
        actual_length = draw(st.integers(0, 700))
        isos = ()
    transfer_buffer = (
        draw(st.binary(min_size=actual_length, max_size=actual_length)) if direction == USBIP_DIR_IN else b""
    )
    ret = RetSubmit(
        seqnum=draw(u32),
        devid=draw(u32),
        direction=draw(u32),
        ep=draw(u32),
        status=draw(s32),
        actual_length=actual_length,
        start_frame=draw(s32),
        number_of_packets=number_of_packets,
        error_count=draw(s32),
        transfer_buffer=transfer_buffer,
        iso_packet_descriptors=isos,
    )
    return ret, direction


cmd_unlinks = st.builds(CmdUnlink, seqnum=u32, devid=u32, direction=u32, ep=u32, unlink_seqnum=u32)
ret_unlinks = st.builds(RetUnlink, seqnum=u32, devid=u32, direction=u32, ep=u32, status=s32)


@st.composite
def usb_devices(draw: st.DrawFn, num_interfaces: int | None = None) -> UsbDevice:
    return UsbDevice(
        path=draw(c_string(255)),
        busid=draw(c_string(31)),
        busnum=draw(u32),
        devnum=draw(u32),
        speed=draw(u32),
        idVendor=draw(u16),
        idProduct=draw(u16),
        bcdDevice=draw(u16),
        bDeviceClass=draw(u8),
        bDeviceSubClass=draw(u8),
        bDeviceProtocol=draw(u8),
        bConfigurationValue=draw(u8),
        bNumConfigurations=draw(u8),
        bNumInterfaces=draw(st.integers(0, 32)) if num_interfaces is None else num_interfaces,
    )


usb_interfaces = st.builds(UsbInterface, bInterfaceClass=u8, bInterfaceSubClass=u8, bInterfaceProtocol=u8)


@st.composite
def devlist_extras(draw: st.DrawFn) -> OpDevlistReplyExtra:
    uinf = tuple(draw(st.lists(usb_interfaces, max_size=4)))
    return OpDevlistReplyExtra(udev=draw(usb_devices(len(uinf))), uinf=uinf)


op_rep_devlists = st.one_of(
    st.builds(OpRepDevlist, status=st.just(0), devices=st.lists(devlist_extras(), max_size=3).map(tuple)),
    st.builds(OpRepDevlist, status=st.integers(1, 0xFFFFFFFF), devices=st.just(())),
)
op_rep_imports = st.one_of(
    st.builds(OpRepImport, status=st.just(0), udev=usb_devices()),
    st.builds(OpRepImport, status=st.integers(1, 0xFFFFFFFF), udev=st.none()),
)
op_req_imports = st.builds(OpReqImport, busid=c_string(31))
op_req_devlists = st.just(OpReqDevlist())
