"""A pyusb backend whose devices are imported from a USB/IP server, so unmodified pyusb code drives them.

    import usb.core, usb.util
    from emulator.pyusb_backend import get_backend

    backend = get_backend("127.0.0.1", "1-1")          # imports busid 1-1 (OP_REQ_IMPORT)
    dev = usb.core.find(idVendor=0x1209, backend=backend)
    dev.set_configuration()
    print(usb.util.get_string(dev, dev.iProduct))
    dev.read(0x81, 8, timeout=1000)
    backend.close()                                    # releases the device on the server

It implements `usb.backend.IBackend` over `emulator.sync_host.SyncRemoteDevice`. Descriptors come from the
device's own GET_DESCRIPTOR answers, read at import. Errors map the way libusb's do, so code written for
the libusb1 backend handles them unchanged: a STALL is `USBError` errno EPIPE (LIBUSB_ERROR_PIPE, -9), a
timeout `USBTimeoutError` (LIBUSB_ERROR_TIMEOUT, -7), a lost connection ENODEV (LIBUSB_ERROR_NO_DEVICE, -4),
babble EOVERFLOW (LIBUSB_ERROR_OVERFLOW, -8), other URB failures EIO (LIBUSB_ERROR_IO, -1). As in libusb,
a timeout of 0 ms means "no timeout". There is no kernel driver on a remote device: interface claiming is
bookkeeping only, and `detach_kernel_driver` reports LIBUSB_ERROR_NOT_FOUND as libusb does when no driver
is bound.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import math
from collections.abc import Iterable, Iterator
from typing import Any

import usb.backend
import usb.core

from emulator.host import (
    CONNECT_TIMEOUT,
    DeviceGone,
    HostError,
    StallError,
    TransferError,
    TransferTimeout,
    UnsupportedTransfer,
)
from emulator.sync_host import SyncRemoteDevice, list_devices_sync
from emulator.usb.descriptors import (
    AlternateSetting,
    Configuration,
    Descriptor,
    Endpoint,
)
from emulator.usbip.constants import EOVERFLOW, USBIP_PORT, UsbDeviceSpeed

log = logging.getLogger(__name__)

# libusb return codes (libusb.h enum libusb_error) and the texts pyusb's libusb1 backend gives them.
LIBUSB_ERROR_IO = -1
LIBUSB_ERROR_INVALID_PARAM = -2
LIBUSB_ERROR_NO_DEVICE = -4
LIBUSB_ERROR_NOT_FOUND = -5
LIBUSB_ERROR_TIMEOUT = -7
LIBUSB_ERROR_OVERFLOW = -8
LIBUSB_ERROR_PIPE = -9
LIBUSB_ERROR_OTHER = -99

_LIBUSB: dict[int, tuple[str, int | None]] = {
    LIBUSB_ERROR_IO: ("Input/output error", errno.EIO),
    LIBUSB_ERROR_INVALID_PARAM: ("Invalid parameter", errno.EINVAL),
    LIBUSB_ERROR_NO_DEVICE: ("No such device (it may have been disconnected)", errno.ENODEV),
    LIBUSB_ERROR_NOT_FOUND: ("Entity not found", errno.ENOENT),
    LIBUSB_ERROR_TIMEOUT: ("Operation timed out", errno.ETIMEDOUT),
    LIBUSB_ERROR_OVERFLOW: ("Overflow", errno.EOVERFLOW),
    LIBUSB_ERROR_PIPE: ("Pipe error", errno.EPIPE),
    LIBUSB_ERROR_OTHER: ("Unknown error", None),
}

# enum usb_device_speed (what USB/IP carries) -> enum libusb_speed (what pyusb's Device.speed holds)
_LIBUSB_SPEED = {
    UsbDeviceSpeed.USB_SPEED_UNKNOWN: 0,
    UsbDeviceSpeed.USB_SPEED_LOW: 1,
    UsbDeviceSpeed.USB_SPEED_FULL: 2,
    UsbDeviceSpeed.USB_SPEED_HIGH: 3,
    UsbDeviceSpeed.USB_SPEED_WIRELESS: 3,  # libusb has no wireless speed; it is high-speed signalling
    UsbDeviceSpeed.USB_SPEED_SUPER: 4,
    UsbDeviceSpeed.USB_SPEED_SUPER_PLUS: 5,
}


def _usb_error(code: int, detail: str) -> usb.core.USBError:
    text, number = _LIBUSB[code]
    cls = usb.core.USBTimeoutError if code == LIBUSB_ERROR_TIMEOUT else usb.core.USBError
    return cls(f"{text} ({detail})", code, number)


@contextlib.contextmanager
def _as_usb_errors() -> Iterator[None]:
    """Turn the host's errors into the USBError libusb would have produced."""
    try:
        yield
    except TransferTimeout as exc:
        raise _usb_error(LIBUSB_ERROR_TIMEOUT, str(exc)) from exc
    except StallError as exc:
        raise _usb_error(LIBUSB_ERROR_PIPE, str(exc)) from exc
    except TransferError as exc:
        code = LIBUSB_ERROR_OVERFLOW if exc.status == -EOVERFLOW else LIBUSB_ERROR_IO
        raise _usb_error(code, str(exc)) from exc
    except DeviceGone as exc:
        raise _usb_error(LIBUSB_ERROR_NO_DEVICE, str(exc)) from exc
    except UnsupportedTransfer as exc:
        raise _usb_error(LIBUSB_ERROR_INVALID_PARAM, str(exc)) from exc
    except HostError as exc:
        raise _usb_error(LIBUSB_ERROR_OTHER, str(exc)) from exc


def _timeout(ms: int | None) -> float | None:
    """pyusb/libusb milliseconds -> seconds; 0 means no timeout, as in libusb."""
    return None if not ms else ms / 1000.0


# -- descriptor views pyusb reads its fields from ----------------------------------------------------------


class _Fields:
    """A plain attribute bag: pyusb copies descriptor fields with getattr()."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.__dict__}>"


def _extra(descriptors: Iterable[Descriptor]) -> list[int]:
    return list(b"".join(d.to_bytes() for d in descriptors))


def _config_fields(config: Configuration, raw: bytes) -> _Fields:
    d = config.descriptor
    # libusb's config "extra": what sits between the header and the first interface (an IAD included)
    lead = config.interfaces[0].alternates[0].leading if config.interfaces else ()
    return _Fields(bLength=raw[0], bDescriptorType=raw[1], wTotalLength=len(raw),
                   bNumInterfaces=len(config.interfaces), bConfigurationValue=d.configuration_value,
                   iConfiguration=d.i_configuration, bmAttributes=d.attributes, bMaxPower=d.max_power,
                   extra_descriptors=_extra((*config.descriptors, *lead)))


def _interface_fields(alt: AlternateSetting) -> _Fields:
    d = alt.descriptor
    return _Fields(bLength=9, bDescriptorType=0x04, bInterfaceNumber=d.interface_number,
                   bAlternateSetting=d.alternate_setting, bNumEndpoints=len(alt.endpoints),
                   bInterfaceClass=d.interface_class, bInterfaceSubClass=d.interface_subclass,
                   bInterfaceProtocol=d.interface_protocol, iInterface=d.i_interface,
                   extra_descriptors=_extra(alt.descriptors))


def _endpoint_fields(endpoint: Endpoint) -> _Fields:
    d = endpoint.descriptor
    extra = bytes(d.extra)
    return _Fields(bLength=7 + len(extra), bDescriptorType=0x05, bEndpointAddress=d.endpoint_address,
                   bmAttributes=d.attributes, wMaxPacketSize=d.max_packet_size, bInterval=d.interval,
                   bRefresh=extra[0] if len(extra) > 0 else 0, bSynchAddress=extra[1] if len(extra) > 1 else 0,
                   extra_descriptors=_extra(endpoint.descriptors))


def _port_numbers(busid: str) -> tuple[int, ...] | None:
    """'1-1.2' -> (1, 2): the hub ports on the way to the device, as libusb_get_port_numbers gives them."""
    _, _, ports = busid.partition("-")
    try:
        return tuple(int(p) for p in ports.split(".")) if ports else None
    except ValueError:
        return None


class RemoteUsbDevice:
    """The backend's device identification (what `enumerate_devices` yields) and open handle."""

    def __init__(self, device: SyncRemoteDevice) -> None:
        self.device = device
        self.claimed: set[int] = set()

    def __repr__(self) -> str:
        return f"<RemoteUsbDevice {self.device.busid}>"


class RemoteBackend(usb.backend.IBackend):  # type: ignore[misc]
    """`usb.backend.IBackend` over devices imported from a USB/IP server. Use `get_backend()`."""

    def __init__(self, devices: Iterable[SyncRemoteDevice]) -> None:
        super().__init__()
        self.devices = [RemoteUsbDevice(d) for d in devices]

    def close(self) -> None:
        """Release every imported device."""
        for dev in self.devices:
            with contextlib.suppress(HostError):
                dev.device.close()

    def _finalize_object(self) -> None:
        self.close()

    def __enter__(self) -> RemoteBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- enumeration and descriptors -----------------------------------------------------------------------

    def enumerate_devices(self) -> Iterator[RemoteUsbDevice]:
        return iter([d for d in self.devices if not d.device.closed])

    def get_parent(self, dev: RemoteUsbDevice) -> None:
        return None

    def get_device_descriptor(self, dev: RemoteUsbDevice) -> _Fields:
        remote = dev.device
        d = remote.device_descriptor
        ports = _port_numbers(remote.busid)
        return _Fields(bLength=18, bDescriptorType=0x01, bcdUSB=d.bcd_usb, bDeviceClass=d.device_class,
                       bDeviceSubClass=d.device_subclass, bDeviceProtocol=d.device_protocol,
                       bMaxPacketSize0=d.max_packet_size0, idVendor=d.id_vendor, idProduct=d.id_product,
                       bcdDevice=d.bcd_device, iManufacturer=d.i_manufacturer, iProduct=d.i_product,
                       iSerialNumber=d.i_serial_number, bNumConfigurations=d.num_configurations,
                       bus=remote.udev.busnum, address=remote.udev.devnum,
                       port_number=ports[-1] if ports else None, port_numbers=ports,
                       speed=_LIBUSB_SPEED.get(remote.speed, 0))  # type: ignore[call-overload]

    def _config(self, dev: RemoteUsbDevice, config: int) -> tuple[Configuration, bytes]:
        configs = dev.device.configurations
        if not 0 <= config < len(configs):
            raise _usb_error(LIBUSB_ERROR_NOT_FOUND, f"configuration index {config} of {len(configs)}")
        return configs[config], dev.device.raw_configurations[config]

    def _alternate(self, dev: RemoteUsbDevice, intf: int, alt: int, config: int) -> AlternateSetting:
        configuration, _ = self._config(dev, config)
        if not 0 <= intf < len(configuration.interfaces):
            raise IndexError(f"Invalid interface index {intf}")
        alternates = configuration.interfaces[intf].alternates
        if not 0 <= alt < len(alternates):
            raise IndexError(f"Invalid alternate setting index {alt}")
        return alternates[alt]

    def get_configuration_descriptor(self, dev: RemoteUsbDevice, config: int) -> _Fields:
        return _config_fields(*self._config(dev, config))

    def get_interface_descriptor(self, dev: RemoteUsbDevice, intf: int, alt: int, config: int) -> _Fields:
        return _interface_fields(self._alternate(dev, intf, alt, config))

    def get_endpoint_descriptor(self, dev: RemoteUsbDevice, ep: int, intf: int, alt: int,
                                config: int) -> _Fields:
        endpoints = self._alternate(dev, intf, alt, config).endpoints
        if not 0 <= ep < len(endpoints):
            raise IndexError(f"Invalid endpoint index {ep}")
        return _endpoint_fields(endpoints[ep])

    # -- handles and configuration ---------------------------------------------------------------------------

    def open_device(self, dev: RemoteUsbDevice) -> RemoteUsbDevice:
        if dev.device.closed:
            raise _usb_error(LIBUSB_ERROR_NO_DEVICE, f"{dev.device.busid} is no longer imported")
        return dev

    def close_device(self, dev_handle: RemoteUsbDevice) -> None:
        dev_handle.claimed.clear()

    def set_configuration(self, dev_handle: RemoteUsbDevice, config_value: int) -> None:
        with _as_usb_errors():
            dev_handle.device.set_configuration(config_value)

    def get_configuration(self, dev_handle: RemoteUsbDevice) -> int:
        with _as_usb_errors():
            return dev_handle.device.get_configuration()

    def set_interface_altsetting(self, dev_handle: RemoteUsbDevice, intf: int, altsetting: int) -> None:
        with _as_usb_errors():
            dev_handle.device.set_interface(intf, altsetting)

    def claim_interface(self, dev_handle: RemoteUsbDevice, intf: int) -> None:
        dev_handle.claimed.add(intf)

    def release_interface(self, dev_handle: RemoteUsbDevice, intf: int) -> None:
        dev_handle.claimed.discard(intf)

    # -- transfers -------------------------------------------------------------------------------------------

    @staticmethod
    def _fill(buff: array.array[int], data: bytes) -> int:
        view = memoryview(buff).cast("B")
        view[:len(data)] = data
        return len(data)

    def bulk_write(self, dev_handle: RemoteUsbDevice, ep: int, intf: int, data: array.array[int],
                   timeout: int) -> int:
        with _as_usb_errors():
            return dev_handle.device.bulk_out(ep, data.tobytes(), _timeout(timeout))

    def bulk_read(self, dev_handle: RemoteUsbDevice, ep: int, intf: int, buff: array.array[int],
                  timeout: int) -> int:
        with _as_usb_errors():
            data = dev_handle.device.bulk_in(ep, len(buff) * buff.itemsize, _timeout(timeout))
        return self._fill(buff, data)

    def intr_write(self, dev_handle: RemoteUsbDevice, ep: int, intf: int, data: array.array[int],
                   timeout: int) -> int:
        with _as_usb_errors():
            return dev_handle.device.interrupt_out(ep, data.tobytes(), _timeout(timeout))

    def intr_read(self, dev_handle: RemoteUsbDevice, ep: int, intf: int, buff: array.array[int],
                  timeout: int) -> int:
        with _as_usb_errors():
            data = dev_handle.device.interrupt_in(ep, len(buff) * buff.itemsize, _timeout(timeout))
        return self._fill(buff, data)

    def _iso_packet_size(self, dev_handle: RemoteUsbDevice, ep: int) -> int:
        descriptor = dev_handle.device.find_endpoint(ep)
        if descriptor is None:
            raise _usb_error(LIBUSB_ERROR_NOT_FOUND, f"no endpoint {ep:#04x} in the active configuration")
        size = descriptor.max_packet_size
        # libusb_get_max_iso_packet_size: bits 10..0 times (1 + additional transactions in bits 12..11)
        return (size & 0x7FF) * (1 + ((size >> 11) & 3))

    def iso_write(self, dev_handle: RemoteUsbDevice, ep: int, intf: int, data: array.array[int],
                  timeout: int) -> int:
        payload = data.tobytes()
        size = self._iso_packet_size(dev_handle, ep)
        packets = [payload[i:i + size] for i in range(0, len(payload), size)] or [b""]
        with _as_usb_errors():
            results = dev_handle.device.iso_out(ep, packets, _timeout(timeout))
        return sum(r.actual_length for r in results)

    def iso_read(self, dev_handle: RemoteUsbDevice, ep: int, intf: int, buff: array.array[int],
                 timeout: int) -> int:
        length = len(buff) * buff.itemsize
        size = self._iso_packet_size(dev_handle, ep)
        count = max(1, math.ceil(length / size))
        lengths = [size] * (count - 1) + [length - size * (count - 1)]
        with _as_usb_errors():
            results = dev_handle.device.iso_in(ep, lengths, _timeout(timeout))
        view = memoryview(buff).cast("B")
        for i, result in enumerate(results):  # as libusb: packet i lands at its own offset in the buffer
            view[i * size:i * size + len(result.data)] = result.data
        return sum(r.actual_length for r in results)

    def ctrl_transfer(self, dev_handle: RemoteUsbDevice, bmRequestType: int, bRequest: int, wValue: int,
                      wIndex: int, data: array.array[int], timeout: int) -> int:
        length = len(data) * data.itemsize
        with _as_usb_errors():
            if bmRequestType & 0x80:
                got = dev_handle.device.control_transfer(bmRequestType, bRequest, wValue, wIndex, length,
                                                         _timeout(timeout))
                assert isinstance(got, bytes)
                return self._fill(data, got)
            written = dev_handle.device.control_transfer(bmRequestType, bRequest, wValue, wIndex,
                                                         data.tobytes(), _timeout(timeout))
            assert isinstance(written, int)
            return written

    def clear_halt(self, dev_handle: RemoteUsbDevice, ep: int) -> None:
        with _as_usb_errors():
            dev_handle.device.clear_halt(ep)

    def reset_device(self, dev_handle: RemoteUsbDevice) -> None:
        with _as_usb_errors():
            dev_handle.device.reset()

    def is_kernel_driver_active(self, dev_handle: RemoteUsbDevice, intf: int) -> bool:
        return False

    def detach_kernel_driver(self, dev_handle: RemoteUsbDevice, intf: int) -> None:
        raise _usb_error(LIBUSB_ERROR_NOT_FOUND, "no kernel driver is bound to a USB/IP-imported interface")

    def attach_kernel_driver(self, dev_handle: RemoteUsbDevice, intf: int) -> None:
        raise _usb_error(LIBUSB_ERROR_NOT_FOUND, "no kernel driver to re-attach on a USB/IP-imported device")


def get_backend(host: str, busid: str | Iterable[str] | None = None, port: int = USBIP_PORT, *,
                timeout: float = CONNECT_TIMEOUT) -> RemoteBackend:
    """A pyusb backend holding devices imported from `host`: `busid` (one, several, or None for every
    device the server exports). Importing happens here, so a wrong busid or a busy device raises now
    (`emulator.host.HostError`); `backend.close()` (or the backend's finalizer) releases them."""
    devices: list[SyncRemoteDevice] = []
    try:
        if busid is None:
            busids = [d.udev.busid for d in list_devices_sync(host, port, timeout=timeout)]
        elif isinstance(busid, str):
            busids = [busid]
        else:
            busids = list(busid)
        for b in busids:
            devices.append(SyncRemoteDevice.open(host, b, port, timeout=timeout))
    except BaseException:
        for device in devices:
            with contextlib.suppress(HostError):
                device.close()
        raise
    return RemoteBackend(devices)


__all__ = ["RemoteBackend", "RemoteUsbDevice", "get_backend"]
