"""scapy layers for Linux usbmon records: LINKTYPE_USB_LINUX (189) and LINKTYPE_USB_LINUX_MMAPPED (220).

The record is `struct usbmon_packet` of the kernel's Documentation/usb/usbmon.rst (48 bytes; 64 with the
interval, start_frame, xfer_flags and ndesc words of the mmap interface), followed for the mmapped form by `ndesc`
ISO descriptors and then by `len_cap` bytes of data. libpcap writes it in the capturing host's byte order; these
layers read little-endian, as tcpdump/dumpcap write on x86 and ARM. (`captures.transactions` also reads the
big-endian form, keyed on the file's byte order.)

Registered in scapy's link-layer table, so `rdpcap()` of a usbmon capture yields these layers. What the data
means is decided like Wireshark does: the SETUP packet of the 'S' record tells what a control completion holds,
and BOT CBW/CSW are recognised by content on bulk endpoints, with the data phase between them decoded for the
command of the last CBW. The layers remember 'S' records by (bus, URB id) in file order for that purpose.
"""

from __future__ import annotations

from scapy.config import conf
from scapy.fields import (
    ByteEnumField,
    ByteField,
    ConditionalField,
    LEIntField,
    LEShortField,
    LESignedIntField,
    LESignedLongField,
    PacketField,
    PacketListField,
    StrFixedLenField,
    XByteField,
    XLEIntField,
    XLELongField,
)
from scapy.packet import Packet

from captures.layers._state import BoundedDict
from captures.layers.bot_scsi import BOT_CBW, BOT_CSW, cbw_command, dissect_bulk
from captures.layers.usb import USB_Setup, dissect_control_in

DLT_USB_LINUX = 189
DLT_USB_LINUX_MMAPPED = 220

URB_SUBMIT = ord("S")
URB_COMPLETE = ord("C")
URB_ERROR = ord("E")
URB_TYPES = {URB_SUBMIT: "S", URB_COMPLETE: "C", URB_ERROR: "E"}

# xfer_type of struct usbmon_packet: ISO (0), Intr, Control, Bulk (3)
XFER_ISO = 0
XFER_INTERRUPT = 1
XFER_CONTROL = 2
XFER_BULK = 3
XFER_TYPES = {XFER_ISO: "ISO", XFER_INTERRUPT: "INTERRUPT", XFER_CONTROL: "CONTROL", XFER_BULK: "BULK"}
XFER_TYPE_NAMES = {
    XFER_ISO: "isochronous",
    XFER_INTERRUPT: "interrupt",
    XFER_CONTROL: "control",
    XFER_BULK: "bulk",
}

USBMON_HEADER_SIZE = 48
USBMON_MMAPPED_HEADER_SIZE = 64
USBMON_ISODESC_SIZE = 16

# scapy field name -> Wireshark field (packet-usb.c), for `tshark -T fields` comparisons.
WIRESHARK_FIELDS = {
    "id": "usb.urb_id",
    "type": "usb.urb_type",
    "xfer_type": "usb.transfer_type",
    "epnum": "usb.endpoint_address",
    "devnum": "usb.device_address",
    "busnum": "usb.bus_id",
    "flag_setup": "usb.setup_flag",
    "flag_data": "usb.data_flag",
    "ts_sec": "usb.urb_ts_sec",
    "ts_usec": "usb.urb_ts_usec",
    "status": "usb.urb_status",
    "length": "usb.urb_len",
    "len_cap": "usb.data_len",
    "error_count": "usb.iso.error_count",
    "numdesc": "usb.iso.numdesc",
    "interval": "usb.interval",
    "start_frame": "usb.start_frame",
    "xfer_flags": "usb.copy_of_transfer_flags",
    "ndesc": "usb.iso.numdesc",
    "iso_status": "usb.iso.iso_status",
    "iso_off": "usb.iso.iso_off",
    "iso_len": "usb.iso.iso_len",
}

# Memory of the capture read so far: the 'S' record of each URB (by bus and URB id) and the command of the
# last CBW per device (by bus and address). URB ids are kernel addresses and are reused, which is why an entry
# is replaced by every new 'S'.
_SUBMITS: BoundedDict[tuple[int, int], bytes | None] = BoundedDict(1 << 16)
_BOT: BoundedDict[tuple[int, int], tuple[int, int | None]] = BoundedDict(1024)


def reset_state() -> None:
    """Forget the records seen so far (they are otherwise remembered across files)."""
    _SUBMITS.clear()
    _BOT.clear()


class USBmon_IsoDescriptor(Packet):
    """struct usbmon_isodesc (mmapped records only)."""

    name = "usbmon iso descriptor"
    fields_desc = [
        LESignedIntField("iso_status", 0),
        LEIntField("iso_off", 0),
        LEIntField("iso_len", 0),
        LEIntField("iso_pad", 0),
    ]

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s


def _setup_present(p: Packet) -> bool:
    return p.flag_setup == 0


def _iso_union(p: Packet) -> bool:
    return p.flag_setup != 0 and p.xfer_type == XFER_ISO


def _unused_union(p: Packet) -> bool:
    return p.flag_setup != 0 and p.xfer_type != XFER_ISO


_COMMON_FIELDS = [
    XLELongField("id", 0),
    ByteEnumField("type", URB_SUBMIT, URB_TYPES),
    ByteEnumField("xfer_type", XFER_BULK, XFER_TYPES),
    XByteField("epnum", 0x81),
    ByteField("devnum", 1),
    LEShortField("busnum", 1),
    XByteField("flag_setup", ord("-")),  # 0 when `setup` holds a SETUP packet
    XByteField("flag_data", 0),  # 0 when data follows; else '<' '>' '=' ... telling why not
    LESignedLongField("ts_sec", 0),
    LESignedIntField("ts_usec", 0),
    LESignedIntField("status", 0),
    LEIntField("length", 0),
    LEIntField("len_cap", None),
    # the 8-byte union s: the SETUP packet, the ISO counters, or unused
    ConditionalField(PacketField("setup", USB_Setup(), USB_Setup), _setup_present),
    ConditionalField(LESignedIntField("error_count", 0), _iso_union),
    ConditionalField(LESignedIntField("numdesc", 0), _iso_union),
    ConditionalField(StrFixedLenField("s", b"\0" * 8, 8), _unused_union),
]


class USBmon(Packet):
    """A usbmon record as captured with LINKTYPE_USB_LINUX (48-byte header, then the data)."""

    name = "USB URB (usbmon)"
    fields_desc = list(_COMMON_FIELDS)
    header_size = USBMON_HEADER_SIZE

    @property
    def endpoint_address(self) -> int:
        return int(self.epnum)

    @property
    def direction_in(self) -> bool:
        return bool(self.epnum & 0x80)

    @property
    def ts(self) -> float:
        return self.ts_sec + self.ts_usec / 1e6

    def post_build(self, p: bytes, pay: bytes) -> bytes:
        if self.len_cap is None:
            p = p[:36] + len(pay).to_bytes(4, "little") + p[40:]
        return p + pay

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        n = self.len_cap or 0
        return s[:n], s[n:]

    def guess_payload_class(self, payload: bytes) -> type[Packet]:
        return conf.raw_layer

    def do_dissect_payload(self, s: bytes) -> None:
        """The data is decoded with what earlier records said (the SETUP of this URB, the open CBW)."""
        if not s:
            return
        try:
            layer = self._decode_data(s)
        except Exception:
            if conf.debug_dissector:
                raise
            layer = conf.raw_layer(s)
        self.add_payload(layer)

    def _decode_data(self, s: bytes) -> Packet:
        if self.xfer_type == XFER_CONTROL and self.type == URB_COMPLETE and self.direction_in:
            return dissect_control_in(_SUBMITS.get((self.busnum, self.id)), s)
        if self.xfer_type == XFER_BULK:
            return dissect_bulk(s, _BOT.get((self.busnum, self.devnum)) if self.direction_in else None)
        return conf.raw_layer(s)

    def post_dissection(self, pkt: Packet) -> None:
        key = (self.busnum, self.id)
        if self.type == URB_SUBMIT:
            _SUBMITS[key] = bytes(self.setup) if self.flag_setup == 0 and self.setup is not None else None
        elif self.type in (URB_COMPLETE, URB_ERROR):
            _SUBMITS.pop(key, None)
        payload = self.payload
        device = (self.busnum, self.devnum)
        if isinstance(payload, BOT_CBW):
            _tag, opcode, service_action = cbw_command(bytes(payload))
            _BOT[device] = (opcode, service_action)
        elif isinstance(payload, BOT_CSW):
            _BOT.pop(device, None)

    def mysummary(self) -> str:
        kind = URB_TYPES.get(self.type, "?")
        return (
            f"usbmon {kind} {XFER_TYPES.get(self.xfer_type, '?')} {self.busnum}:{self.devnum}:"
            f"{self.epnum & 0x7F} {'IN' if self.direction_in else 'OUT'} id=0x{self.id:x} status={self.status} "
            f"len={self.length}"
        )


class USBmonMmapped(USBmon):
    """A usbmon record as captured with LINKTYPE_USB_LINUX_MMAPPED (64-byte header, ISO descriptors, data)."""

    name = "USB URB (usbmon, mmapped)"
    header_size = USBMON_MMAPPED_HEADER_SIZE
    fields_desc = [
        *_COMMON_FIELDS,
        LESignedIntField("interval", 0),
        LESignedIntField("start_frame", 0),
        XLEIntField("xfer_flags", 0),
        LEIntField("ndesc", None),
        PacketListField("iso_descriptors", [], USBmon_IsoDescriptor, count_from=lambda p: p.ndesc),
    ]

    def post_build(self, p: bytes, pay: bytes) -> bytes:
        if self.ndesc is None:
            p = p[:60] + len(self.iso_descriptors or []).to_bytes(4, "little") + p[64:]
        return super().post_build(p, pay)


def _register() -> None:
    conf.l2types.register(DLT_USB_LINUX, USBmon)
    conf.l2types.register(DLT_USB_LINUX_MMAPPED, USBmonMmapped)


_register()
