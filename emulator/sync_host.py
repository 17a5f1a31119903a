"""Blocking facade over the userspace host, for scripts and for the pyusb backend.

`SyncRemoteDevice` holds a `RemoteDevice` imported with `import_device_blocking`: its coroutines run to their
end in the calling thread on the blocking runtime (`emulator.blocking`) — no event loop, no loop thread, no
hop between threads per call, and the same code, timeouts, unlinks and errors as on asyncio. Every wait is
bounded by the transfer's own timeout (and an unanswered unlink by `UNLINK_TIMEOUT`). Several threads may use
one device at once (e.g. one blocked on an interrupt IN, another doing control transfers).

`LoopThread` runs an asyncio event loop in a daemon thread, for asyncio code that a blocking program needs
running beside it (a server in the same process, in tests and demos).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar

from emulator.host import (
    CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    HostError,
    IsoPacketResult,
    RemoteDevice,
    import_device_blocking,
    list_devices_blocking,
)
from emulator.usb.descriptors import Configuration, DeviceDescriptor, EndpointDescriptor
from emulator.usbip import OpDevlistReplyExtra, UsbDevice
from emulator.usbip.constants import USBIP_PORT

T = TypeVar("T")

class LoopThread:
    """An asyncio event loop running in a daemon thread; `run(coro, timeout)` blocks for its result."""

    def __init__(self, name: str = "vusb-host") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run `coro` on the loop and wait at most `timeout` seconds (None: until it finishes)."""
        if not self._thread.is_alive():
            coro.close()
            raise HostError("the host's event loop thread is not running (closed?)")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise HostError(f"the host did not finish the call within {timeout:g} s") from None

    def close(self) -> None:
        """Stop the loop and join its thread (pending tasks are abandoned)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


def list_devices_sync(host: str, port: int = USBIP_PORT, *,
                      timeout: float | None = CONNECT_TIMEOUT) -> tuple[OpDevlistReplyExtra, ...]:
    """`emulator.host.list_devices`, blocking."""
    return list_devices_blocking(host, port, timeout=timeout)


class SyncRemoteDevice:
    """A `RemoteDevice` driven from ordinary (non-async) code; same methods, blocking.

        with SyncRemoteDevice.open("127.0.0.1", "1-1") as dev:
            dev.set_configuration(1)
            print(dev.get_string(dev.device_descriptor.i_product))
    """

    def __init__(self, device: RemoteDevice) -> None:
        self.device = device  # imported with import_device_blocking

    @classmethod
    def open(cls, host: str, busid: str, port: int = USBIP_PORT, *,
             timeout: float | None = CONNECT_TIMEOUT) -> SyncRemoteDevice:
        """Import `busid` from `host` (see `emulator.host.import_device`)."""
        return cls(import_device_blocking(host, busid, port, timeout=timeout))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine of the device (or of something built on it, e.g. `MassStorage`) to its end."""
        return self.device.run(coro)

    # -- what the device is --------------------------------------------------------------------------------

    @property
    def udev(self) -> UsbDevice:
        return self.device.udev

    @property
    def busid(self) -> str:
        return self.device.busid

    @property
    def speed(self) -> int:
        return self.device.speed

    @property
    def device_descriptor(self) -> DeviceDescriptor:
        return self.device.device_descriptor

    @property
    def configurations(self) -> tuple[Configuration, ...]:
        return self.device.configurations

    @property
    def raw_configurations(self) -> tuple[bytes, ...]:
        return self.device.raw_configurations

    @property
    def configuration_value(self) -> int | None:
        return self.device.configuration_value

    @property
    def closed(self) -> bool:
        return self.device.closed

    def find_endpoint(self, address: int) -> EndpointDescriptor | None:
        return self.device.find_endpoint(address)

    def __repr__(self) -> str:
        return f"<Sync{self.device!r}>"

    # -- transfers -------------------------------------------------------------------------------------------

    def control_transfer(self, request_type: int, request: int, value: int = 0, index: int = 0,
                         data_or_length: bytes | bytearray | memoryview | int = 0,
                         timeout: float | None = DEFAULT_TIMEOUT) -> bytes | int:
        return self.run(self.device.control_transfer(request_type, request, value, index, data_or_length,
                                                     timeout))

    def bulk_in(self, endpoint: int, length: int, timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
        return self.run(self.device.bulk_in(endpoint, length, timeout))

    def bulk_out(self, endpoint: int, data: bytes | bytearray | memoryview,
                 timeout: float | None = DEFAULT_TIMEOUT) -> int:
        return self.run(self.device.bulk_out(endpoint, bytes(data), timeout))

    def interrupt_in(self, endpoint: int, length: int, timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
        return self.run(self.device.interrupt_in(endpoint, length, timeout))

    def interrupt_out(self, endpoint: int, data: bytes | bytearray | memoryview,
                      timeout: float | None = DEFAULT_TIMEOUT) -> int:
        return self.run(self.device.interrupt_out(endpoint, bytes(data), timeout))

    def iso_in(self, endpoint: int, packet_lengths: Sequence[int],
               timeout: float | None = DEFAULT_TIMEOUT) -> tuple[IsoPacketResult, ...]:
        return self.run(self.device.iso_in(endpoint, packet_lengths, timeout))

    def iso_out(self, endpoint: int, packets: Sequence[bytes],
                timeout: float | None = DEFAULT_TIMEOUT) -> tuple[IsoPacketResult, ...]:
        return self.run(self.device.iso_out(endpoint, packets, timeout))

    # -- chapter 9 -------------------------------------------------------------------------------------------

    def get_descriptor(self, descriptor_type: int, index: int = 0, length: int = 0xFF, language: int = 0,
                       timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
        return self.run(self.device.get_descriptor(descriptor_type, index, length, language, timeout))

    def langids(self, timeout: float | None = DEFAULT_TIMEOUT) -> tuple[int, ...]:
        return self.run(self.device.langids(timeout))

    def get_string(self, index: int, langid: int | None = None,
                   timeout: float | None = DEFAULT_TIMEOUT) -> str | None:
        return self.run(self.device.get_string(index, langid, timeout))

    def get_configuration(self, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        return self.run(self.device.get_configuration(timeout))

    def set_configuration(self, value: int = 1, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.run(self.device.set_configuration(value, timeout))

    def set_interface(self, interface: int, alternate: int, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.run(self.device.set_interface(interface, alternate, timeout))

    def clear_halt(self, endpoint: int, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.run(self.device.clear_halt(endpoint, timeout))

    def reset(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.run(self.device.reset(timeout))

    # -- lifetime --------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the device (close the connection)."""
        if not self.device.closed:
            self.run(self.device.close())

    def __enter__(self) -> SyncRemoteDevice:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


__all__ = ["LoopThread", "SyncRemoteDevice", "list_devices_sync"]
