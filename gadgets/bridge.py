"""The bridge: a device exported by a USB/IP server, presented to a local USB host as a Linux gadget.

`emulator.host` imports the device (OP_REQ_IMPORT) and enumerates it; the gadget mirrors what it read —
IDs, class triple, strings, power, speed, and through one FunctionFS function the active configuration's
interfaces, endpoint types, packet sizes, intervals and the class descriptors f_fs can carry (HID report
descriptors are fetched by the host through ep0, which is forwarded; CDC functional descriptors f_fs
refuses are listed). Then requests flow: SETUP requests that reach the function are sent to the remote and
answered from its reply (a STALL stays a STALL); bulk and interrupt data move both ways with several URBs in
flight per endpoint (`gadgets.transfers` sizes them so no transfer is merged or split wrongly; Bulk-Only
mass storage is framed from its CBWs).

One event loop runs it all: an asyncio loop on a thread of its own owns the `RemoteDevice`, and the gadget's
FunctionFS is served from the same loop (`FunctionFs.run_on`). A CBW read from the gadget becomes a URB in
the callback that received it, the data of a RET_SUBMIT is written to the gadget where it was decoded, and
a control request is answered when its URB returns (a `PendingReply`): no thread hop anywhere, which
matters because a hop between two busy Python threads waits for the GIL's switch interval (5 ms), and a
Bulk-Only command makes several.

What the host does that libcomposite keeps to itself reaches the remote as its effect: ENABLE (the host's
SET_CONFIGURATION or SET_INTERFACE) sends SET_CONFIGURATION to the remote; DISABLE and UNBIND (host reset,
driver gone, unplug) unlink every URB still at the remote. A halt the remote reports (-EPIPE) halts the
gadget endpoint once and is cleared at the remote at once (the UDC answers the host's CLEAR_FEATURE without
telling us, as in `gadgets.model`). When the remote goes away the gadget is unbound and the error says why.
Isochronous endpoints are refused (`ffs_layout`): neither FunctionFS nor this bridge can keep their timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emulator.devices.base import STALL, Reply
from emulator.host import (
    DeviceGone,
    HostError,
    RemoteDevice,
    TransferError,
    Urb,
    UrbResult,
    import_device,
)
from emulator.usb.descriptors import Configuration, DeviceDescriptor, InterfaceAssociationDescriptor
from emulator.usb.setup import (
    FeatureSelector,
    SetupPacket,
    Speed,
    StandardRequest,
    TransferType,
)
from emulator.usbip.constants import EOVERFLOW, EPIPE, USBIP_PORT
from gadgets.configfs import FunctionSpec, GadgetSpec
from gadgets.ffs import (
    ESHUTDOWN,
    LOCK_DIR,
    FfsEndpoint,
    FfsEvent,
    FfsLayout,
    FunctionFs,
    FunctionFsError,
    FunctionFsGadget,
    PendingReply,
    ffs_layout,
    report_lines,
)
from gadgets.transfers import BulkOnlySizer, PacketSizer, TransferSizer, is_bulk_only

log = logging.getLogger(__name__)

US_BULK_RESET_REQUEST = 0xFF
BOT_IN_CHUNK = 256 * 1024  # a Bulk-Only data-in is asked of the remote in URBs this big (pipelined)
INTO_MIN = 16 * 1024  # IN URBs this big are read into a reused buffer of their pipe, written to the gadget from it
CONTROL_TIMEOUT = 5.0  # the kernel's USB_CTRL_GET_TIMEOUT; the local host gives up about then too
_CLASS_OUT_TO_INTERFACE = 0x21  # bmRequestType of the Bulk-Only reset
_STANDARD_OUT_TO_ENDPOINT = 0x02  # of CLEAR_FEATURE(ENDPOINT_HALT)
BRIDGES_DIR = LOCK_DIR / "bridges"
_MAX_SPEED = {Speed.LOW: "full-speed", Speed.FULL: "full-speed", Speed.HIGH: "high-speed",
              Speed.SUPER: "super-speed", Speed.SUPER_PLUS: "super-speed"}


class BridgeError(FunctionFsError):
    """The bridge cannot start or had to stop (remote unreachable or gone, a device it cannot mirror)."""


# --- what the remote looks like --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteImage:
    """What the bridge mirrors: read from the remote once, at import."""

    host: str
    port: int
    busid: str
    speed: Speed
    device: DeviceDescriptor
    configuration: Configuration
    strings: dict[int, str]


async def describe_remote(remote: RemoteDevice, host: str, port: int) -> RemoteImage:
    """The active configuration (the first one if the exporter left it unconfigured) and every string the
    gadget will show."""
    value = 0
    with contextlib.suppress(TransferError):
        value = await remote.get_configuration()
    configuration = remote.configuration(value) or (remote.configurations[0] if remote.configurations else None)
    if configuration is None:
        raise BridgeError(f"{remote.busid} on {host}:{port} has no configuration to mirror")
    d = remote.device_descriptor
    indices = {d.i_manufacturer, d.i_product, d.i_serial_number, configuration.descriptor.i_configuration}
    for interface in configuration.interfaces:
        for alt in interface.alternates:
            indices.add(alt.descriptor.i_interface)
            indices.update(x.i_function for x in alt.leading if isinstance(x, InterfaceAssociationDescriptor))
    strings: dict[int, str] = {}
    for index in sorted(i for i in indices if i):
        try:
            strings[index] = await remote.get_string(index) or ""
        except (TransferError, HostError) as exc:
            if isinstance(exc, DeviceGone):
                raise
            log.warning("string %d of %s: %s (left empty)", index, remote.busid, exc)
    try:
        speed = Speed(remote.speed)
    except ValueError:
        speed = Speed.HIGH
    return RemoteImage(host, port, remote.busid, speed, d, configuration, strings)


def bridge_spec(image: RemoteImage, name: str) -> GadgetSpec:
    """The configfs side: the remote's identity, power and speed."""
    d = image.device
    header = image.configuration.descriptor
    unit = 8 if image.speed >= Speed.SUPER else 2
    instance = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return GadgetSpec(
        name=name, idVendor=d.id_vendor, idProduct=d.id_product, bcdDevice=d.bcd_device, bcdUSB=d.bcd_usb,
        bDeviceClass=d.device_class, bDeviceSubClass=d.device_subclass, bDeviceProtocol=d.device_protocol,
        manufacturer=image.strings.get(d.i_manufacturer, ""), product=image.strings.get(d.i_product, ""),
        serialnumber=image.strings.get(d.i_serial_number, ""),
        configuration=image.strings.get(header.i_configuration, ""),
        bmAttributes=header.attributes | 0x80, MaxPower=min(header.max_power * unit, 900),
        functions=(FunctionSpec("ffs", instance),), max_speed=_MAX_SPEED.get(image.speed),
    )


# --- the remote side: an asyncio loop on its own thread ----------------------------------------------------------


class RemoteSide:
    """The `RemoteDevice` and the event loop it lives on; the gadget's FunctionFS is served on the same loop
    (`FunctionFs.run_on`), so everything the bridge does happens on that one thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bridge", daemon=True)
        self._thread.start()
        self.remote: RemoteDevice | None = None
        self._watcher: asyncio.Task[None] | None = None

    def run(self, coro: Any, timeout: float | None) -> Any:
        """Run a coroutine on the loop and wait for it from another thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def open(self, host: str, busid: str, port: int, tap: Any = None) -> RemoteImage:
        async def go() -> RemoteImage:
            self.remote = await import_device(host, busid, port, tap=tap)
            return await describe_remote(self.remote, host, port)

        image: RemoteImage = self.run(go(), 60)
        return image

    def watch(self, on_lost: Callable[[str], None], interval: float = 0.5) -> None:
        """Call `on_lost(reason)` (on the loop) once the connection to the remote is gone, even when no URB
        is pending to fail with it (a deconfigured bridge has none)."""
        remote = self.remote
        if remote is None:
            return

        async def go() -> None:
            while not remote.closed:
                await asyncio.sleep(interval)
            on_lost(f"the USB/IP connection to {remote.host}:{remote.port} closed")

        def start() -> None:
            self._watcher = self.loop.create_task(go())

        self.loop.call_soon_threadsafe(start)

    def background(self, coro: Any, done: Callable[[BaseException | None], None]) -> None:
        """Run `coro` on the loop without waiting; `done(error)` on the loop after."""

        async def go() -> None:
            try:
                await coro
            except BaseException as exc:  # reported, not raised: nobody awaits this task
                done(exc)
            else:
                done(None)

        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(go()))

    def close(self) -> None:
        async def stop_watching() -> None:
            if self._watcher is not None:
                self._watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watcher

        with contextlib.suppress(Exception):
            self.run(stop_watching(), 10)
        if self.remote is not None:
            with contextlib.suppress(Exception):
                self.run(self.remote.close(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


# --- the FunctionFS side ---------------------------------------------------------------------------------------


class _Token:
    """One URB at the remote as its pipe knows it."""

    __slots__ = ("buffer", "cancelled", "done", "error", "length", "result", "stale", "urb")

    def __init__(self, length: int) -> None:
        self.length = length  # what an IN URB asked for
        self.urb: Urb | None = None
        self.result: UrbResult | None = None
        self.error: BaseException | None = None
        self.done = False
        self.cancelled = False
        self.stale = False  # cancelled because the sizer said so: results behind it wait until it is gone
        self.buffer: bytearray | None = None  # an IN URB's data goes here (the pipe's, reused)


@dataclass
class _Pipe:
    ep: FfsEndpoint
    sizer: TransferSizer
    urbs: deque[_Token] = field(default_factory=deque)  # at the remote, in submission order
    pending: deque[bytes] = field(default_factory=deque)  # OUT: read from the gadget, not yet submitted
    halt_pending: bool = False  # IN: halt the gadget endpoint once its queued writes are gone
    clearing: bool = False  # CLEAR_FEATURE(ENDPOINT_HALT) on its way to the remote
    partners: tuple[_Pipe, ...] = ()  # OUT: the IN pipes of its interface (a CBW plans their transfers)
    stale: int = 0  # IN: stale URBs still at the remote (being unlinked)
    held: list[tuple[memoryview | bytes, bytearray | None]] = field(default_factory=list)  # IN: (data, its
    # buffer) to write once the stale URBs are gone
    pool: list[bytearray] = field(default_factory=list)  # IN: buffers no URB or gadget write holds
    is_in: bool = False  # of `ep`, kept plain: looked at several times per URB
    index: int = 0

    def __post_init__(self) -> None:
        self.is_in, self.index = self.ep.is_in, self.ep.index


class BridgeFunction:
    """The `FunctionFsHandler` that forwards everything to the remote. It runs on the remote's loop (the
    FunctionFS side is served there too): a URB is submitted where the gadget transfer that asks for it
    completes, and its result is written to the gadget where the RET_SUBMIT is decoded."""

    def __init__(self, remote: RemoteSide, image: RemoteImage, layout: FfsLayout, *, depth: int = 8,
                 in_chunk: int | None = BOT_IN_CHUNK, on_failure: Callable[[str], None] | None = None) -> None:
        self.remote = remote
        self.image = image
        self.layout = layout
        self.depth = depth
        self.in_chunk = in_chunk
        self.on_failure = on_failure
        self.ffs: FunctionFs | None = None
        self.active = False
        self.failure: str | None = None
        self._pipes: dict[int, _Pipe] = {}
        self.reported: list[str] = []  # what the last ENABLE showed: libcomposite's part, the numbers given
        self.configuration_value = image.configuration.descriptor.configuration_value

    # -- FunctionFsHandler ------------------------------------------------------------------------------

    def attach(self, ffs: FunctionFs) -> None:
        self.ffs = ffs
        self._build_pipes(self.image.speed)
        self.remote.watch(lambda why: self._fail(f"the remote device went away: {why}"))

    def _build_pipes(self, speed: Speed) -> None:
        speed = Speed.FULL if speed is Speed.LOW else min(speed, Speed.SUPER)
        self._pipes = {}
        for ep in self.layout.endpoints:
            interface = self.layout.interface_for(ep.interface)
            packet = ep.packet_size(speed)
            sizer: TransferSizer
            if interface is not None and ep.transfer_type is TransferType.BULK and is_bulk_only(
                    interface.interface_class, interface.interface_subclass, interface.interface_protocol):
                sizer = self._bot_sizer(ep.interface, packet)
            else:
                sizer = PacketSizer(packet, in_size=packet, depth=self.depth)
            self._pipes[ep.index] = _Pipe(ep, sizer)
        for pipe in self._pipes.values():
            if not pipe.is_in:
                pipe.partners = tuple(other for other in self._pipes.values()
                                      if other.is_in and other.ep.interface == pipe.ep.interface)

    def _bot_sizer(self, interface: int, packet: int) -> TransferSizer:
        """One BulkOnlySizer per BOT interface, shared by its IN and OUT pipes (the CBW plans the IN side)."""
        for pipe in self._pipes.values():
            if pipe.ep.interface == interface and isinstance(pipe.sizer, BulkOnlySizer):
                return pipe.sizer
        return BulkOnlySizer(packet, in_chunk=self.in_chunk and max(packet, self.in_chunk), depth=self.depth)

    def event(self, event: FfsEvent) -> None:
        ffs = self._ffs
        if event is FfsEvent.ENABLE:
            self._cancel_all()
            self._build_pipes(ffs.speed or self.image.speed)
            self._report()
            self.active = False  # until the remote is configured too
            self.remote.background(self._device.set_configuration(self.configuration_value), self._configured)
        elif event in (FfsEvent.DISABLE, FfsEvent.UNBIND):
            if self.active:
                log.info("local host %s: unlinking the URBs at the remote",
                         "disabled the function" if event is FfsEvent.DISABLE else "went away")
            self.active = False
            self._cancel_all()
        else:
            log.debug("FunctionFS %s", event.value)

    def _configured(self, error: BaseException | None) -> None:
        if error is not None:
            if isinstance(error, DeviceGone):
                self._fail(f"the remote device went away: {error}")
                return
            log.warning("SET_CONFIGURATION(%d) at the remote failed: %s", self.configuration_value, error)
        if self._ffs.enabled:
            self.active = True
            self._pump_pipes()

    def control(self, setup: SetupPacket, data: bytes) -> PendingReply:
        """Forward the request as a control URB; the answer is the remote's (a STALL stays a STALL)."""
        answer = PendingReply()
        if self.failure is not None or self.remote.remote is None:
            answer.resolve(STALL)
            return answer
        is_in = setup.request_type & 0x80
        if setup.request == US_BULK_RESET_REQUEST and setup.request_type == _CLASS_OUT_TO_INTERFACE:
            self._restart_interface(setup.index & 0xFF)  # no stale URB may catch the next command's data
        try:
            with self._device.batched():  # out now, not at the end of the loop's turn
                urb = self._device.submit(is_in, setup.length if is_in else data, setup=setup,
                                          timeout=CONTROL_TIMEOUT)
        except HostError as exc:
            self._fail(f"the remote device went away: {exc}")
            answer.resolve(STALL)
            return answer
        urb.on_done = functools.partial(self._control_done, setup, answer)
        return answer

    def _control_done(self, setup: SetupPacket, answer: PendingReply, urb: Urb) -> None:
        future = urb.future
        reply = STALL
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or isinstance(error, DeviceGone):
            self._fail(f"the remote device went away: {error or 'the URB was cancelled'}")
        elif error is not None:
            log.warning("%s at the remote: %s; answering STALL", setup, error)
        else:
            result = future.result()
            if result.status == 0 and not result.unlinked:
                reply = (Reply(data=result.data) if setup.request_type & 0x80
                         else Reply(actual_length=result.actual_length))
            elif result.unlinked and urb.timed_out:
                log.warning("%s: no answer from the remote within %g s; answering STALL", setup, CONTROL_TIMEOUT)
            elif result.status != -EPIPE:
                log.warning("%s at the remote ended with status %d; answering STALL", setup, result.status)
        if (setup.request_type == _STANDARD_OUT_TO_ENDPOINT and setup.request == StandardRequest.CLEAR_FEATURE
                and setup.value == FeatureSelector.ENDPOINT_HALT and reply is not STALL):
            ep = self.layout.endpoint_by_address(setup.index & 0xFF)
            if ep is not None:
                self._pipes[ep.index].halt_pending = False
        answer.resolve(reply)
        if not setup.request_type & 0x80:  # an OUT request (a reset, a clear-halt) may let a pipe go on
            self._pump_pipes()

    def pump(self) -> None:
        """Nothing, after a turn of FunctionFS's loop: whatever lets a pipe go on (a URB or a gadget transfer
        ending, a CBW, the remote configured, a halt cleared, an OUT request answered) pumps that pipe where it
        happens, so the call FunctionFs makes after every turn (four per Bulk-Only command, one per control
        request) costs nothing."""

    def _pump_pipes(self) -> None:
        if not self.active:
            return
        for pipe in self._pipes.values():
            if pipe.is_in:
                self._pump_in(pipe)
            else:
                self._pump_out(pipe)

    def poll_timeout(self) -> float | None:
        return None

    def outstanding(self) -> int:
        """URBs submitted to the remote and not ended yet."""
        return sum(1 for pipe in self._pipes.values() for token in pipe.urbs if not token.done)

    # -- plumbing ---------------------------------------------------------------------------------------------

    @property
    def _ffs(self) -> FunctionFs:
        if self.ffs is None:
            raise RuntimeError("BridgeFunction is not attached to a FunctionFs")
        return self.ffs

    @property
    def _device(self) -> RemoteDevice:
        if self.remote.remote is None:
            raise RuntimeError("the remote device is not open")
        return self.remote.remote

    def _fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
            log.info("bridge stopping: %s", why)  # the owner reports it (`vusb attach`: its one error line)
            self.active = False
            if self.on_failure is not None:
                self.on_failure(why)
            self._ffs.stop()

    def _cancel(self, token: _Token, *, stale: bool = False) -> None:
        token.cancelled = True
        token.stale = stale  # a cancel for a reset leaves nothing to wait for
        if not token.done and token.urb is not None and self.remote.remote is not None:
            self.remote.remote.cancel(token.urb)

    def _cancel_all(self) -> None:
        for pipe in self._pipes.values():
            self._restart(pipe)
            pipe.halt_pending = False

    def _restart_interface(self, interface: int) -> None:
        for pipe in self._pipes.values():
            if pipe.ep.interface == interface:
                self._restart(pipe)

    def _restart(self, pipe: _Pipe) -> None:
        """Drop all `pipe` has under way (its URBs at the remote unlinked) and start its transfers afresh."""
        for token in pipe.urbs:
            self._cancel(token)
        pipe.pending.clear()
        pipe.held.clear()
        pipe.stale = 0
        pipe.sizer.reset()

    def _submit(self, pipe: _Pipe, data_or_length: bytes | int) -> None:
        """Send one URB now (it leaves with whatever else this turn of the loop submits)."""
        token = _Token(data_or_length if isinstance(data_or_length, int) else 0)
        pipe.urbs.append(token)
        into = None
        if pipe.is_in and token.length >= INTO_MIN:
            pool = pipe.pool
            token.buffer = buffer = pool.pop() if pool and len(pool[-1]) >= token.length else bytearray(token.length)
            into = memoryview(buffer)[: token.length]
        device = self.remote.remote
        assert device is not None  # the bridge is attached only once the remote is open
        try:
            urb = device.submit(pipe.ep.address, data_or_length, timeout=None, into=into)
        except HostError as exc:
            token.error, token.done = exc, True
            self.remote.loop.call_soon(self._urb_done, pipe)
            return
        token.urb = urb
        urb.on_done = functools.partial(self._urb_finished, pipe, token)

    def _urb_finished(self, pipe: _Pipe, token: _Token, urb: Urb) -> None:
        try:
            token.result = urb.future.result()  # one call in the usual case, not cancelled/exception/result
        except asyncio.CancelledError:
            token.error = DeviceGone("the URB was cancelled")
        except BaseException as exc:  # the URB's error, handed on as _result expects it
            token.error = exc
        token.done = True
        self._urb_done(pipe)

    def _urb_done(self, pipe: _Pipe) -> None:
        """Hand on results in submission order (the remote completes an endpoint's URBs in order)."""
        urbs = pipe.urbs
        while urbs and urbs[0].done:
            token = urbs.popleft()
            if token.stale:
                pipe.stale -= 1
            self._result(pipe, token)
            if token.buffer is not None:  # not handed on to a gadget write
                pipe.pool.append(token.buffer)
        if pipe.held and not pipe.stale:
            held, pipe.held = pipe.held, []
            for data, buffer in held:
                self._write_in(pipe, data, buffer)
        if pipe.is_in:
            self._pump_in(pipe)
        else:
            self._pump_out(pipe)

    def _result(self, pipe: _Pipe, token: _Token) -> None:
        error = token.error
        if error is not None:
            if isinstance(error, DeviceGone):
                if not token.cancelled:
                    self._fail(f"the remote device went away: {error}")
            else:
                log.warning("URB on %#04x failed: %s", pipe.ep.address, error)
            return
        result = token.result
        assert result is not None
        if result.unlinked or token.cancelled:
            return
        status = result.status
        if status == -EPIPE:
            if pipe.is_in:
                self._drop_stale(pipe, pipe.sizer.in_stalled(token.length))
            if not (pipe.halt_pending or pipe.clearing):  # URBs queued behind a stalled one fail too
                self._remote_halted(pipe)
            return
        if status and status != -EOVERFLOW:  # -EOVERFLOW: forward what came
            log.warning("URB on %#04x ended with status %d", pipe.ep.address, status)
            if status == -ESHUTDOWN:
                self._fail(f"the remote device shut down (status {status})")
            return
        if pipe.is_in:
            buffer = token.buffer
            data: memoryview | bytes = result.data if buffer is None else memoryview(buffer)[: result.actual_length]
            stale = pipe.sizer.in_done(data)
            if stale:
                self._drop_stale(pipe, stale)
            token.buffer = None  # the write has it now
            if pipe.stale:
                pipe.held.append((data, buffer))  # the CSW: the host's next command must not meet a stale URB
            else:
                self._write_in(pipe, data, buffer)

    def _write_in(self, pipe: _Pipe, data: memoryview | bytes, buffer: bytearray | None) -> None:
        if self.active and self._ffs.write(pipe.index, data, functools.partial(self._write_done, pipe, buffer)):
            return
        log.debug("IN %#04x: %d bytes not queued on the gadget", pipe.ep.address, len(data))
        if buffer is not None:
            pipe.pool.append(buffer)

    def _drop_stale(self, pipe: _Pipe, count: int) -> None:
        """Unlink the `count` newest URBs of `pipe`: the device ended the transfer they were asked for early,
        so what it sends next (the CSW, then the next command's data) must not land in them."""
        for token in list(pipe.urbs)[len(pipe.urbs) - count:]:
            if not token.stale:
                pipe.stale += 1
                self._cancel(token, stale=True)

    def _remote_halted(self, pipe: _Pipe) -> None:
        """The remote STALLed: the local host sees it once, the remote is cleared right away."""
        address = pipe.ep.address
        log.debug("remote halted %#04x", address)
        if pipe.is_in:
            pipe.halt_pending = True
        else:
            self._ffs.halt(pipe.index)
            pipe.pending.clear()
        pipe.clearing = True

        def cleared(error: BaseException | None) -> None:
            pipe.clearing = False
            if isinstance(error, DeviceGone):
                self._fail(f"the remote device went away: {error}")
            elif error is not None:
                log.warning("CLEAR_FEATURE(ENDPOINT_HALT) %#04x at the remote: %s", address, error)
            self._pump_pipes()

        self.remote.background(self._device.clear_halt(address), cleared)

    def _write_done(self, pipe: _Pipe, buffer: bytearray | None, status: int) -> None:
        if buffer is not None:
            pipe.pool.append(buffer)
        if status < 0 and status != -ESHUTDOWN:
            log.debug("IN %#04x: gadget write ended with %d", pipe.ep.address, status)
        self._pump_in(pipe)

    def _pump_in(self, pipe: _Pipe) -> None:
        ffs = self.ffs
        assert ffs is not None
        index = pipe.index
        if pipe.halt_pending:
            if ffs.in_flight(index):
                return
            ffs.halt(index)
            pipe.halt_pending = False
        if not self.active or pipe.clearing or pipe.stale:
            return
        while len(pipe.urbs) + ffs.in_flight(index) < self.depth:
            size = pipe.sizer.next_in(len(pipe.urbs))
            if size is None:
                return
            self._submit(pipe, size)

    def _pump_out(self, pipe: _Pipe) -> None:
        ffs = self.ffs
        assert ffs is not None
        index = pipe.index
        if not self.active or pipe.clearing:
            return
        while pipe.pending and len(pipe.urbs) < self.depth:
            self._submit(pipe, pipe.pending.popleft())
        while True:
            queued = ffs.in_flight(index) + len(pipe.urbs) + len(pipe.pending)
            if queued >= self.depth:
                return
            size = pipe.sizer.next_read(queued)
            if size is None or not ffs.read(index, size, functools.partial(self._read_done, pipe)):
                return

    def _read_done(self, pipe: _Pipe, data: bytes | None, status: int) -> None:
        if data is None or status < 0:
            if status != -ESHUTDOWN:
                log.debug("OUT %#04x: gadget read ended with %d", pipe.ep.address, status)
            return
        if not self.active:
            return
        pipe.sizer.out_done(data)
        pipe.pending.append(data)
        with self._device.batched():  # a CBW and the data and CSW URBs it plans leave in one write, now
            self._pump_out(pipe)
            for other in pipe.partners:  # a CBW plans the IN side of its interface
                self._pump_in(other)

    def _report(self) -> None:
        lines = report_lines(self.layout, self._ffs)
        if lines != self.reported:
            for line in lines:
                log.info("%s", line)
            self.reported = lines


# --- putting it together ---------------------------------------------------------------------------------------


class Bridge:
    """Import `busid` from `host` and present it on a UDC until closed (a context manager).

    `wait()` returns when the bridge stops on its own (the remote went away: `failure` says why)."""

    def __init__(self, host: str, busid: str, *, port: int = USBIP_PORT, udc: str | None = None,
                 name: str | None = None, depth: int = 8, tap: Any = None) -> None:
        """`tap` sees every byte of the USB/IP connection (`emulator.tap`), e.g. a pcapng recorder's."""
        self.host, self.busid, self.port = host, busid, port
        self.tap = tap
        self.requested_udc = udc
        self.name = name or f"vusb-bridge-{busid.replace('.', '_').replace(':', '_')}"
        self.depth = depth
        self.remote = RemoteSide()
        self.image: RemoteImage | None = None
        self.layout: FfsLayout | None = None
        self.handler: BridgeFunction | None = None
        self.gadget: FunctionFsGadget | None = None
        self._state_file: Path | None = None

    @property
    def failure(self) -> str | None:
        return self.handler.failure if self.handler is not None else None

    @property
    def udc(self) -> str | None:
        return self.gadget.udc if self.gadget is not None else None

    def __enter__(self) -> Bridge:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        try:
            image = self.remote.open(self.host, self.busid, self.port, self.tap)
        except HostError as exc:
            raise BridgeError(f"cannot import {self.busid} from {self.host}:{self.port}: {exc}") from exc
        except TimeoutError:
            raise BridgeError(f"{self.host}:{self.port} did not let us import {self.busid} within 60 s") from None
        self.image = image
        try:
            self.layout = ffs_layout(image.configuration, image.speed, image.strings)
        except FunctionFsError as exc:
            raise BridgeError(f"{self.busid} ({image.device.id_vendor:04x}:{image.device.id_product:04x}) "
                              f"cannot be bridged: {exc}") from exc
        for item in self.layout.dropped:
            log.warning("not carried by FunctionFS: %s", item)
        self.handler = BridgeFunction(self.remote, image, self.layout, depth=self.depth)
        self.gadget = FunctionFsGadget(bridge_spec(image, self.name), self.layout, self.handler,
                                       udc=self.requested_udc, loop=self.remote.loop,
                                       ffs_options={"in_depth": self.depth, "out_depth": self.depth})
        self.gadget.start()
        self._write_state()

    def wait(self, timeout: float | None = None) -> bool:
        assert self.gadget is not None
        return self.gadget.wait(timeout)

    def close(self) -> None:
        try:
            if self.gadget is not None:
                self.gadget.close()
        finally:
            self.remote.close()
            if self._state_file is not None:
                with contextlib.suppress(OSError):
                    self._state_file.unlink()

    def _write_state(self) -> None:
        """/run/vusb/bridges/NAME.json, for `vusb port` and `vusb detach`."""
        BRIDGES_DIR.mkdir(parents=True, exist_ok=True)
        path = BRIDGES_DIR / f"{self.name}.json"
        d = self.image.device if self.image else None
        path.write_text(json.dumps({
            "name": self.name, "pid": os.getpid(), "host": self.host, "port": self.port, "busid": self.busid,
            "udc": self.udc, "id": f"{d.id_vendor:04x}:{d.id_product:04x}" if d else "",
        }))
        self._state_file = path


def running_bridges() -> list[dict[str, Any]]:
    """Bridges whose process is still alive, from their state files."""
    found = []
    for path in sorted(BRIDGES_DIR.glob("*.json")) if BRIDGES_DIR.is_dir() else []:
        try:
            state = json.loads(path.read_text())
            os.kill(int(state["pid"]), 0)
        except (OSError, ValueError, KeyError):
            continue
        found.append(state)
    return found
