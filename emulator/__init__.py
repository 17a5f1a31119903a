"""vusb: USB devices over IP, in Python.

`emulator` holds the pure cores (USB/IP protocol in `emulator.usbip`, USB chapter-9 types in `emulator.usb`,
device models in `emulator.devices`) and the edges that speak to the network (server, userspace host, CLI).
"""

__version__ = "0.1.0"
