"""USB chapter-9 types: SETUP packets and standard requests (`setup`), descriptors and the
configuration tree (`descriptors`). Pure data and bytes, no I/O; the device models, the userspace host,
the gadget bridge and the scapy layers all speak USB through these."""

from emulator.usb.errors import DescriptorError, SetupError, UsbError

__all__ = ["DescriptorError", "SetupError", "UsbError"]
