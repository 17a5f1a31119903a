"""A vusb device model (`emulator.devices.base.Device`) presented to a real USB host as a Linux gadget.

The configfs gadget takes the model's identity (IDs, class triple, strings, power, speed); one FunctionFS
function carries its interfaces and endpoints (`gadgets.ffs.ffs_layout` says what f_fs cannot carry).
Requests that reach the function go to `Device.control`; bulk and interrupt data go to `Device.transfer`:
OUT reads are handed over as they complete (a NAK keeps them until the model's wake-up), IN data is asked
for ahead of the host, several transfers queued per endpoint.

What libcomposite answers itself never reaches the model, so the model is told in its own terms: the
ENABLE event becomes SET_CONFIGURATION(bConfigurationValue), DISABLE and UNBIND become a port reset.
Endpoint halts belong to the UDC, which also answers CLEAR_FEATURE(ENDPOINT_HALT) without telling anyone:
when the model halts an endpoint (a STALL reply, or a halt it sets itself), the edge halts the endpoint
file once (an IN endpoint after the data queued before the stall has gone) and clears the halt in the
model through chapter 9 at once, so the model continues where the host will after its CLEAR_FEATURE. A
model that re-halts in `clear_halt` (BOT's wedge after an invalid CBW) is asked again after the next ep0
request, e.g. the Bulk-Only reset of reset recovery. FunctionFS has no wedge: the host's CLEAR_FEATURE does
clear the UDC's halt.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import deque
from dataclasses import dataclass, field

from emulator.devices.base import Device, Reply, TransferStatus
from emulator.usb.setup import (
    FeatureSelector,
    Recipient,
    RequestType,
    SetupPacket,
    Speed,
    StandardRequest,
    TransferType,
)
from gadgets.configfs import FunctionSpec, GadgetSpec
from gadgets.ffs import (
    ESHUTDOWN,
    FfsEndpoint,
    FfsEvent,
    FfsLayout,
    FunctionFs,
    FunctionFsGadget,
    ffs_layout,
    report_lines,
)
from gadgets.transfers import BulkOnlySizer, PacketSizer, TransferSizer, is_bulk_only

log = logging.getLogger(__name__)

US_BULK_RESET_REQUEST = 0xFF  # Bulk-Only Mass Storage Reset (BOT 1.0 §3.1)
MAX_SPEED_NAMES = {Speed.FULL: "full-speed", Speed.HIGH: "high-speed", Speed.SUPER: "super-speed"}


@dataclass
class _InPipe:
    ep: FfsEndpoint
    waiting: bool = False  # the model NAK'd: ask again after its wake-up
    halt_pending: bool = False  # halt the endpoint file once the queued writes are gone
    wedged: bool = False  # the model keeps it halted: wait for an ep0 request
    stalls: int = 0  # STALLs in a row with nothing in between


@dataclass
class _OutPipe:
    ep: FfsEndpoint
    sizer: TransferSizer
    pending: deque[bytes] = field(default_factory=deque)  # received, not yet taken by the model
    waiting: bool = False
    wedged: bool = False


class ModelFunction:
    """The `FunctionFsHandler` that serves a `Device` (runs on the FunctionFS loop thread)."""

    def __init__(self, device: Device, layout: FfsLayout, *, in_chunk: int = 64 * 1024, depth: int = 4,
                 poll_interval: float = 0.05) -> None:
        self.device = device
        self.layout = layout
        self.in_chunk = in_chunk
        self.depth = depth
        self.poll_interval = poll_interval
        self.ffs: FunctionFs | None = None
        self.active = False
        self._in: dict[int, _InPipe] = {}
        self._out: dict[int, _OutPipe] = {}
        self._reported: list[str] = []
        self._configuration_value = device.configuration.descriptor.configuration_value

    # -- FunctionFsHandler ------------------------------------------------------------------------------

    def attach(self, ffs: FunctionFs) -> None:
        self.ffs = ffs
        self.device.set_wakeup(ffs.wake)
        self._build_pipes(self.layout.source_speed)

    def _build_pipes(self, speed: Speed) -> None:
        self._in, self._out = {}, {}
        for ep in self.layout.endpoints:
            if ep.is_in:
                self._in[ep.index] = _InPipe(ep)
                continue
            interface = self.layout.interface_for(ep.interface)
            packet = ep.packet_size(speed)
            sizer: TransferSizer
            if interface is not None and ep.transfer_type is TransferType.BULK and is_bulk_only(
                    interface.interface_class, interface.interface_subclass, interface.interface_protocol):
                sizer = BulkOnlySizer(packet, depth=self.depth)
            else:
                sizer = PacketSizer(packet, depth=self.depth)
            self._out[ep.index] = _OutPipe(ep, sizer)

    def event(self, event: FfsEvent) -> None:
        ffs = self._ffs
        if event is FfsEvent.ENABLE:
            self._build_pipes(ffs.speed or self.layout.source_speed)
            self._report()
            if ffs.speed is not None and ffs.speed != self.device.speed:
                log.warning("the link runs at %s speed, the model at %s: packet sizes differ from the model's",
                            ffs.speed.name.lower(), self.device.speed.name.lower())
            if self.device.configured:
                self.device.reset()  # SET_CONFIGURATION again, or SET_INTERFACE: start afresh
            reply = self.device.control(SetupPacket(0x00, StandardRequest.SET_CONFIGURATION,
                                                    self._configuration_value))
            if reply.status is not TransferStatus.OK:
                log.error("the model refused SET_CONFIGURATION(%d)", self._configuration_value)
            self.active = True
            self._sync_halts()
            self.pump()
        elif event in (FfsEvent.DISABLE, FfsEvent.UNBIND):
            if self.active or self.device.configured:
                log.info("host %s: resetting the model", "disabled the function" if event is FfsEvent.DISABLE
                         else "went away")
            self.active = False
            self._build_pipes(ffs.speed or self.layout.source_speed)
            self.device.reset()
        else:
            log.debug("FunctionFS %s", event.value)

    def control(self, setup: SetupPacket, data: bytes) -> Reply:
        reply = self.device.control(setup, data)
        if (setup.type is RequestType.CLASS and setup.recipient == Recipient.INTERFACE
                and setup.request == US_BULK_RESET_REQUEST and reply.status is TransferStatus.OK):
            for pipe in self._out.values():
                if pipe.ep.interface == setup.index & 0xFF:
                    pipe.sizer.reset()
                    pipe.pending.clear()
        self._unwedge()
        self._sync_halts()
        self._ffs.wake()  # whatever the request changed, give the endpoints a look
        return reply

    def pump(self) -> None:
        if not self.active:
            return
        for out in self._out.values():
            self._deliver(out)
            self._refill(out)
        for pipe in self._in.values():
            self._pump_in(pipe)

    def poll_timeout(self) -> float | None:
        """Interrupt IN endpoints waiting on the model are polled (HID idle repeats need the clock)."""
        if self.active and any(p.waiting and p.ep.transfer_type is TransferType.INTERRUPT
                               for p in self._in.values()):
            return self.poll_interval
        return None

    # -- halts ----------------------------------------------------------------------------------------------

    @property
    def _ffs(self) -> FunctionFs:
        if self.ffs is None:
            raise RuntimeError("ModelFunction is not attached to a FunctionFs")
        return self.ffs

    def _clear_in_model(self, address: int) -> bool:
        """CLEAR_FEATURE(ENDPOINT_HALT) to the model; True if the endpoint is no longer halted there."""
        self.device.control(SetupPacket(0x02, StandardRequest.CLEAR_FEATURE, FeatureSelector.ENDPOINT_HALT,
                                        address))
        return address not in self.device.halted

    def _sync_halts(self) -> set[int]:
        """Carry halts the model set over to the UDC (see the module docstring); returns their addresses."""
        carried: set[int] = set()
        for address in sorted(self.device.halted):
            ep = self.layout.endpoint_by_address(address)
            if ep is None:
                continue
            if ep.is_in:
                pipe = self._in[ep.index]
                if pipe.wedged:
                    continue
                pipe.halt_pending = True
                pipe.wedged = not self._clear_in_model(address)
            else:
                out = self._out[ep.index]
                if out.wedged:
                    continue
                log.debug("halting OUT %#04x (ep%d)", address, ep.index)
                self._ffs.halt(ep.index)
                if out.pending:
                    log.debug("dropping %d received transfers after the halt", len(out.pending))
                    out.pending.clear()
                out.wedged = not self._clear_in_model(address)
            carried.add(address)
        return carried

    def _unwedge(self) -> None:
        for pipe in self._in.values():
            if pipe.wedged and self._clear_in_model(pipe.ep.address):
                pipe.wedged = False
                pipe.stalls = 0
        for out in self._out.values():
            if out.wedged and self._clear_in_model(out.ep.address):
                out.wedged = False

    # -- IN ---------------------------------------------------------------------------------------------------

    def _in_size(self, ep: FfsEndpoint) -> int:
        speed = self._ffs.speed or self.layout.source_speed
        return ep.packet_size(speed) if ep.transfer_type is TransferType.INTERRUPT else self.in_chunk

    def _pump_in(self, pipe: _InPipe) -> None:
        ffs = self._ffs
        index = pipe.ep.index
        while self.active:
            if pipe.halt_pending:
                if ffs.in_flight(index):
                    return  # dummy_hcd refuses to halt an IN endpoint with transfers queued
                log.debug("halting IN %#04x (ep%d)", pipe.ep.address, index)
                ffs.halt(index)
                pipe.halt_pending = False
                continue
            if pipe.wedged or ffs.in_flight(index) >= self.depth:
                return
            reply = self.device.transfer(pipe.ep.address, None, self._in_size(pipe.ep))
            self._sync_halts()
            if reply is None:
                pipe.waiting = True
                return
            pipe.waiting = False
            if reply.status is TransferStatus.STALL:
                pipe.stalls += 1
                pipe.halt_pending = True  # carried over by _sync_halts already, unless the model kept no halt
                if pipe.stalls > 1:
                    pipe.wedged = True  # STALL after STALL with nothing between: wait for an ep0 request
                continue
            pipe.stalls = 0
            if reply.status not in (TransferStatus.OK, TransferStatus.OVERFLOW):
                log.warning("IN %#04x: the model answered %s; sending what it gave", pipe.ep.address,
                            reply.status.name)
            if not ffs.write(index, bytes(reply.data), functools.partial(self._in_done, pipe)):  # bytes(b) is b
                return

    def _in_done(self, pipe: _InPipe, status: int) -> None:
        if status < 0 and status != -ESHUTDOWN:
            log.debug("IN %#04x: transfer ended with %d", pipe.ep.address, status)
        self._pump_in(pipe)

    # -- OUT --------------------------------------------------------------------------------------------------

    def _refill(self, out: _OutPipe) -> None:
        ffs = self._ffs
        while self.active:
            size = out.sizer.next_read(ffs.in_flight(out.ep.index) + len(out.pending))
            if size is None:
                return
            if not ffs.read(out.ep.index, size, functools.partial(self._out_done, out)):
                return

    def _out_done(self, out: _OutPipe, data: bytes | None, status: int) -> None:
        if data is None or status < 0:
            if status != -ESHUTDOWN:
                log.debug("OUT %#04x: read ended with %d", out.ep.address, status)
            return
        if not self.active:
            return
        out.sizer.out_done(data)
        out.pending.append(data)
        self._deliver(out)
        self._refill(out)

    def _deliver(self, out: _OutPipe) -> None:
        while out.pending and self.active:
            data = out.pending[0]
            reply = self.device.transfer(out.ep.address, data, len(data))
            if reply is None:
                out.waiting = True
                return
            out.waiting = False
            out.pending.popleft()
            if reply.status is TransferStatus.OK and reply.length < len(data):
                log.debug("OUT %#04x: the model took %d of %d bytes", out.ep.address, reply.length, len(data))
            carried = self._sync_halts()
            if reply.status is TransferStatus.STALL and out.ep.address not in carried and not out.wedged:
                self._ffs.halt(out.ep.index)  # a STALL the model keeps no halt for: once, at the UDC
                out.pending.clear()

    # -- reporting ----------------------------------------------------------------------------------------------

    def _report(self) -> None:
        lines = report_lines(self.layout, self._ffs)
        if lines != self._reported:
            for line in lines:
                log.info("%s", line)
            self._reported = lines


def gadget_spec_for(device: Device, name: str) -> GadgetSpec:
    """The configfs side of a model: its IDs, class triple, strings, power and speed."""
    d = device.device_descriptor
    strings = device.strings
    header = device.configuration.descriptor
    unit = 8 if device.speed is Speed.SUPER else 2
    instance = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return GadgetSpec(
        name=name,
        idVendor=d.id_vendor,
        idProduct=d.id_product,
        bcdDevice=d.bcd_device,
        bcdUSB=d.bcd_usb,
        bDeviceClass=d.device_class,
        bDeviceSubClass=d.device_subclass,
        bDeviceProtocol=d.device_protocol,
        bMaxPacketSize0=64,  # libcomposite writes the UDC's ep0 size (and 9 at SuperSpeed) anyway
        manufacturer=strings.get(d.i_manufacturer, ""),
        product=strings.get(d.i_product, ""),
        serialnumber=strings.get(d.i_serial_number, ""),
        configuration=strings.get(header.i_configuration, ""),
        bmAttributes=header.attributes,
        MaxPower=header.max_power * unit,
        functions=(FunctionSpec("ffs", instance),),
        max_speed=MAX_SPEED_NAMES.get(device.speed),
    )


def device_gadget(device: Device, *, name: str = "vusb", udc: str | None = None, in_chunk: int = 64 * 1024,
                  depth: int = 4) -> FunctionFsGadget:
    """A `FunctionFsGadget` serving `device` (use it as a context manager: it binds on entry, tears down on
    exit). What FunctionFS cannot carry is logged as a warning."""
    layout = ffs_layout(device.configuration, device.speed, device.strings)
    for item in layout.dropped:
        log.warning("not carried by FunctionFS: %s", item)
    handler = ModelFunction(device, layout, in_chunk=in_chunk, depth=depth)
    return FunctionFsGadget(gadget_spec_for(device, name), layout, handler, udc=udc,
                            ffs_options={"in_depth": depth, "out_depth": depth})
