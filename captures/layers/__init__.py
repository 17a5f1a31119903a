"""scapy layers for what vusb moves and records: USB/IP, Linux usbmon, USB chapter 9, BOT and SCSI.

Importing this package registers them with scapy (TCP port 3240, link types 189 and 220), so `rdpcap` and
`sniff(session=TCPSession)` decode captures with no further step. `read_packets` picks the right one.
"""

from __future__ import annotations

import os

from scapy.plist import PacketList

from captures.layers import bot_scsi, usb, usbip, usbmon


def read_packets(path: str | os.PathLike[str]) -> PacketList:
    """Every packet of a capture, dissected with state: TCP reassembled for USB/IP (one USB/IP message per
    layer, chained when a segment holds several), usbmon records in file order."""
    from scapy.sendrecv import sniff
    from scapy.sessions import TCPSession

    usbip.reset_conversations()
    usbmon.reset_state()
    return sniff(offline=str(path), session=TCPSession, quiet=True)


__all__ = ["bot_scsi", "read_packets", "usb", "usbip", "usbmon"]
