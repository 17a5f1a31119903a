"""Micro-benchmark of the USB/IP core's hot path (a script, not a test).

Measures messages per second for encode+decode of a 512-byte bulk IN USBIP_RET_SUBMIT and of a
USBIP_CMD_SUBMIT (bulk IN, header only; and bulk OUT with 512 bytes), once through the raw codec
(`pack` + incremental reader) and once through the sans-I/O connections (`send` on one side,
`receive_data` + `next_event` on the other, with seqnum bookkeeping). The target for the server's hot path
is well over 100k RET_SUBMIT messages/s.

    .venv/bin/python tools/bench/bench_codec.py [--count 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from emulator.usbip.codec import DEFAULT_LIMITS, pack, read_cmd_submit, read_ret_submit
from emulator.usbip.connection import ClientConnection, ServerConnection
from emulator.usbip.constants import USBIP_DIR_IN, USBIP_DIR_OUT
from emulator.usbip.messages import CmdSubmit, OpRepImport, OpReqImport, RetSubmit, UsbDevice

PAYLOAD = bytes(range(256)) * 2
UDEV = UsbDevice(
    path="/sys/devices/vusb/1-1",
    busid="1-1",
    busnum=1,
    devnum=2,
    speed=3,
    idVendor=0x1D6B,
    idProduct=0x0104,
    bcdDevice=0x0100,
)


def best_rate(count: int, repeat: int, run: Callable[[int], None]) -> float:
    """Messages per second of the fastest of `repeat` runs of `run(count)`."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run(count)
        best = min(best, time.perf_counter() - start)
    return count / best


def raw_ret_submit(count: int) -> None:
    ret = RetSubmit(seqnum=1, actual_length=len(PAYLOAD), transfer_buffer=PAYLOAD)

    def direction_of(seqnum: int) -> int:
        return USBIP_DIR_IN

    for _ in range(count):
        read_ret_submit(pack(ret), 0, 0, DEFAULT_LIMITS, direction_of)


def raw_cmd_submit(direction: int) -> Callable[[int], None]:
    data = PAYLOAD if direction == USBIP_DIR_OUT else b""
    cmd = CmdSubmit(
        seqnum=1, devid=0x10002, direction=direction, ep=1, transfer_buffer_length=512, transfer_buffer=data
    )

    def run(count: int) -> None:
        for _ in range(count):
            read_cmd_submit(pack(cmd), 0, 0, DEFAULT_LIMITS)

    return run


def imported_pair() -> tuple[ClientConnection, ServerConnection]:
    client, server = ClientConnection(), ServerConnection()
    server.receive_data(client.send(OpReqImport(busid="1-1")))
    server.next_event()
    client.receive_data(server.send(OpRepImport(udev=UDEV)))
    client.next_event()
    return client, server


def connection_rates(count: int, repeat: int, direction: int) -> tuple[float, float]:
    """(CMD_SUBMIT client->server, RET_SUBMIT server->client) messages/s through the connections."""
    best_cmd = best_ret = float("inf")
    data = PAYLOAD if direction == USBIP_DIR_OUT else b""
    answer = PAYLOAD if direction == USBIP_DIR_IN else b""
    for _ in range(repeat):
        client, server = imported_pair()
        devid = client.devid
        assert devid is not None
        seqnums = [client.next_seqnum() + i for i in range(count)]
        start = time.perf_counter()
        for seqnum in seqnums:
            server.receive_data(
                client.send(
                    CmdSubmit(
                        seqnum=seqnum,
                        devid=devid,
                        direction=direction,
                        ep=1,
                        transfer_buffer_length=512,
                        transfer_buffer=data,
                    )
                )
            )
            server.next_event()
        best_cmd = min(best_cmd, time.perf_counter() - start)
        start = time.perf_counter()
        for seqnum in seqnums:
            client.receive_data(
                server.send(RetSubmit(seqnum=seqnum, actual_length=512, transfer_buffer=answer))
            )
            client.next_event()
        best_ret = min(best_ret, time.perf_counter() - start)
    return count / best_cmd, count / best_ret


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="messages per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best counts")
    args = parser.parse_args()
    rows = [
        ("raw codec", "RET_SUBMIT bulk IN, 512 B", best_rate(args.count, args.repeat, raw_ret_submit)),
        (
            "raw codec",
            "CMD_SUBMIT bulk IN (header only)",
            best_rate(args.count, args.repeat, raw_cmd_submit(USBIP_DIR_IN)),
        ),
        (
            "raw codec",
            "CMD_SUBMIT bulk OUT, 512 B",
            best_rate(args.count, args.repeat, raw_cmd_submit(USBIP_DIR_OUT)),
        ),
    ]
    cmd_in, ret_in = connection_rates(args.count, args.repeat, USBIP_DIR_IN)
    cmd_out, ret_out = connection_rates(args.count, args.repeat, USBIP_DIR_OUT)
    rows += [
        ("connections", "CMD_SUBMIT bulk IN (header only)", cmd_in),
        ("connections", "RET_SUBMIT bulk IN, 512 B", ret_in),
        ("connections", "CMD_SUBMIT bulk OUT, 512 B", cmd_out),
        ("connections", "RET_SUBMIT bulk OUT (header only)", ret_out),
    ]
    print(f"encode+decode, best of {args.repeat} runs of {args.count} messages")
    for via, what, rate in rows:
        print(f"  {via:<12} {what:<36} {rate:>12,.0f} msgs/s")


if __name__ == "__main__":
    main()
