"""Blocking facade over the asyncio host, for scripts and for the pyusb backend.

`LoopThread` runs one event loop in a daemon thread; `SyncRemoteDevice` forwards each call to the
`RemoteDevice` living on that loop and blocks until it returns. Every blocking wait is bounded: the inner
call has its own timeout (the transfer's, or the connection's), and the outer wait allows that plus a
margin for the unlink, so a call returns or raises even if the loop itself were stuck.
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
    UNLINK_TIMEOUT,
    HostError,
    IsoPacketResult,
    RemoteDevice,
    import_device,
    list_devices,
)
from emulator.usb.descriptors import Configuration, DeviceDescriptor, EndpointDescriptor
from emulator.usbip import OpDevlistReplyExtra, UsbDevice
from emulator.usbip.constants import USBIP_PORT

T = TypeVar("T")

_MARGIN = UNLINK_TIMEOUT + 3.0


def _guard(timeout: float | None) -> float | None:
    """How long the calling thread waits for a call whose own timeout is `timeout`."""
    return None if timeout is None else timeout + _MARGIN


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


def list_devices_sync(host: str, port: int = USBIP_PORT, *, timeout: float | None = CONNECT_TIMEOUT,
                      loop: LoopThread | None = None) -> tuple[OpDevlistReplyExtra, ...]:
    """`emulator.host.list_devices`, blocking."""
    own = loop is None
    runner = LoopThread() if loop is None else loop
    try:
        return runner.run(list_devices(host, port, timeout=timeout), _guard(timeout))
    finally:
        if own:
            runner.close()


class SyncRemoteDevice:
    """A `RemoteDevice` driven from ordinary (non-async) code; same methods, blocking.

        with SyncRemoteDevice.open("127.0.0.1", "1-1") as dev:
            dev.set_configuration(1)
            print(dev.get_string(dev.device_descriptor.i_product))
    """

    def __init__(self, device: RemoteDevice, loop: LoopThread, *, own_loop: bool = False) -> None:
        self.device = device
        self._runner = loop
        self._own_loop = own_loop

    @classmethod
    def open(cls, host: str, busid: str, port: int = USBIP_PORT, *, timeout: float | None = CONNECT_TIMEOUT,
             loop: LoopThread | None = None) -> SyncRemoteDevice:
        """Import `busid` from `host`; the device gets its own loop thread unless `loop` is given."""
        runner = LoopThread() if loop is None else loop
        try:
            device = runner.run(import_device(host, busid, port, timeout=timeout),
                                None if timeout is None else 4 * timeout + _MARGIN)
        except BaseException:
            if loop is None:
                runner.close()
            raise
        return cls(device, runner, own_loop=loop is None)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        return self._runner.run(coro, _guard(timeout))

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
        return self._call(self.device.control_transfer(request_type, request, value, index, data_or_length,
                                                       timeout), timeout)

    def bulk_in(self, endpoint: int, length: int, timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
        return self._call(self.device.bulk_in(endpoint, length, timeout), timeout)

    def bulk_out(self, endpoint: int, data: bytes | bytearray | memoryview,
                 timeout: float | None = DEFAULT_TIMEOUT) -> int:
        return self._call(self.device.bulk_out(endpoint, bytes(data), timeout), timeout)

    def interrupt_in(self, endpoint: int, length: int, timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
        return self._call(self.device.interrupt_in(endpoint, length, timeout), timeout)

    def interrupt_out(self, endpoint: int, data: bytes | bytearray | memoryview,
                      timeout: float | None = DEFAULT_TIMEOUT) -> int:
        return self._call(self.device.interrupt_out(endpoint, bytes(data), timeout), timeout)

    def iso_in(self, endpoint: int, packet_lengths: Sequence[int],
               timeout: float | None = DEFAULT_TIMEOUT) -> tuple[IsoPacketResult, ...]:
        return self._call(self.device.iso_in(endpoint, packet_lengths, timeout), timeout)

    def iso_out(self, endpoint: int, packets: Sequence[bytes],
                timeout: float | None = DEFAULT_TIMEOUT) -> tuple[IsoPacketResult, ...]:
        return self._call(self.device.iso_out(endpoint, packets, timeout), timeout)

    # -- chapter 9 -------------------------------------------------------------------------------------------

    def get_descriptor(self, descriptor_type: int, index: int = 0, length: int = 0xFF, language: int = 0,
                       timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
        return self._call(self.device.get_descriptor(descriptor_type, index, length, language, timeout),
                          timeout)

    def langids(self, timeout: float | None = DEFAULT_TIMEOUT) -> tuple[int, ...]:
        return self._call(self.device.langids(timeout), timeout)

    def get_string(self, index: int, langid: int | None = None,
                   timeout: float | None = DEFAULT_TIMEOUT) -> str | None:
        return self._call(self.device.get_string(index, langid, timeout), None if timeout is None else 2 * timeout)

    def get_configuration(self, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        return self._call(self.device.get_configuration(timeout), timeout)

    def set_configuration(self, value: int = 1, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self._call(self.device.set_configuration(value, timeout), timeout)

    def set_interface(self, interface: int, alternate: int, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self._call(self.device.set_interface(interface, alternate, timeout), timeout)

    def clear_halt(self, endpoint: int, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self._call(self.device.clear_halt(endpoint, timeout), timeout)

    def reset(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self._call(self.device.reset(timeout), timeout)

    # -- lifetime --------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the device and, if it owns one, stop its loop thread."""
        try:
            if not self.device.closed:
                self._call(self.device.close(), 3.0)
        finally:
            if self._own_loop:
                self._runner.close()

    def __enter__(self) -> SyncRemoteDevice:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


__all__ = ["LoopThread", "SyncRemoteDevice", "list_devices_sync"]
