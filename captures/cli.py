"""`vusb dissect FILE`: a capture's transactions as a table, as JSON lines, or summed up.

The command reads usbmon captures (link types 189/220) and USB/IP over TCP, pairs requests with responses
(`captures.transactions`), filters, and prints. Errors in the file are `CaptureError`s naming the frame; the CLI
group turns them into one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from captures.names import SCSI_OPCODE_VALUES, describe_setup, opcode_name
from captures.transactions import Analysis, ScsiCommand, Transaction, analyze, summarize


def _parse_int(value: str, what: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number ({what})") from None


def _parse_device(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    bus, sep, dev = value.partition(":")
    if not sep:
        raise click.BadParameter(f"{value!r}: expected BUS:DEV, e.g. 1:2", param_hint="--device")
    return _parse_int(bus, "--device bus"), _parse_int(dev, "--device address")


def _parse_endpoint(value: str | None) -> int | None:
    if value is None:
        return None
    ep = _parse_int(value, "--endpoint")
    if not 0 <= ep <= 0xFF or ep & 0x70:
        raise click.BadParameter(
            f"{value!r} is not an endpoint address (0x00-0x0f, 0x80-0x8f)", param_hint="--endpoint"
        )
    return ep


def _parse_opcode(value: str | None) -> int | None:
    if value is None:
        return None
    name = value.upper().replace("-", "_").replace("(", "_").replace(")", "")
    if name == "READ_CAPACITY_16":
        return 0x9E
    if name in SCSI_OPCODE_VALUES:
        return SCSI_OPCODE_VALUES[name]
    try:
        opcode = int(value, 0)
    except ValueError:
        known = ", ".join(sorted(SCSI_OPCODE_VALUES))
        raise click.BadParameter(
            f"{value!r} is neither a number nor one of {known}", param_hint="--scsi-opcode"
        ) from None
    if not 0 <= opcode <= 0xFF:
        raise click.BadParameter(f"{value!r} is not an opcode (0..0xff)", param_hint="--scsi-opcode")
    return opcode


def _matches_endpoint(address: int, wanted: int) -> bool:
    if wanted & 0x0F == 0:  # the default control pipe is one endpoint for both directions
        return address & 0x0F == 0
    return address == wanted


def filter_transactions(
    transactions: list[Transaction],
    *,
    device: tuple[int, int] | None = None,
    busid: str | None = None,
    endpoint: int | None = None,
    scsi_opcode: int | None = None,
) -> list[Transaction]:
    out = []
    for t in transactions:
        if device is not None and (t.busnum, t.devnum) != device:
            continue
        if busid is not None and t.busid != busid:
            continue
        if endpoint is not None and (t.kind != "submit" or not _matches_endpoint(t.endpoint, endpoint)):
            continue
        if scsi_opcode is not None and t.scsi_opcode != scsi_opcode:
            continue
        out.append(t)
    return out


def filter_commands(
    commands: list[ScsiCommand],
    *,
    device: tuple[int, int] | None = None,
    busid: str | None = None,
    scsi_opcode: int | None = None,
) -> list[ScsiCommand]:
    return [
        c
        for c in commands
        if (device is None or (c.busnum, c.devnum) == device)
        and (busid is None or c.busid == busid)
        and (scsi_opcode is None or c.opcode == scsi_opcode)
    ]


def describe(t: Transaction) -> str:
    """What a transaction asked for, in a few words."""
    if t.kind == "import":
        return f"OP_REQ_IMPORT {t.busid or ''}".rstrip()
    if t.kind == "devlist":
        return "OP_REQ_DEVLIST" + (f" ({t.actual_length} devices)" if t.actual_length is not None else "")
    if t.kind == "unlink":
        return f"CMD_UNLINK seqnum {t.unlink_seqnum}"
    if t.setup is not None and t.endpoint & 0x0F == 0:
        return describe_setup(t.setup)
    if t.bot == "CBW":
        return f"CBW {t.scsi_name} tag 0x{t.bot_tag:08x}"
    if t.bot == "CSW":
        status = {0: "passed", 1: "failed", 2: "phase error"}.get(t.csw_status or 0, str(t.csw_status))
        return f"CSW {t.scsi_name or '?'} {status}"
    if t.bot == "data":
        return f"data {t.scsi_name}"
    return ""


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.3f}"


def _frames(a: int | None, b: int | None) -> str:
    return f"{a if a is not None else '?'}→{b if b is not None else '…'}"


def _transactions_table(transactions: list[Transaction], t0: float) -> Table:
    table = Table(show_lines=False, header_style="bold")
    for column, justify in (
        ("#", "right"),
        ("Frames", "left"),
        ("Time", "right"),
        ("Device", "left"),
        ("EP", "left"),
        ("Type", "left"),
        ("Request", "left"),
        ("Status", "left"),
        ("Length", "right"),
        ("Latency ms", "right"),
    ):
        table.add_column(column, justify=justify, no_wrap=column != "Request")  # type: ignore[arg-type]
    for i, t in enumerate(transactions, 1):
        device = t.device + (f" ({t.busid})" if t.busid else "")
        kind = t.transfer_type or ""
        if t.kind == "submit":
            ep = f"0x{t.endpoint:02x} {t.direction.upper()}"
        else:
            ep, kind = "", t.kind
        status = t.status_text
        style = "red" if t.failed and not t.unlinked else "yellow" if not t.complete or t.unlinked else ""
        length = f"{t.requested_length}/{t.actual_length if t.actual_length is not None else '-'}"
        time = f"{t.ts - t0:.6f}" if t.ts is not None else ""
        table.add_row(
            str(i),
            _frames(t.frame, t.response_frame),
            time,
            device,
            ep,
            kind,
            describe(t),
            f"[{style}]{status}[/]" if style else status,
            length,
            _ms(t.latency),
        )
    return table


def _commands_table(commands: list[ScsiCommand], t0: float) -> Table:
    table = Table(header_style="bold")
    for column in (
        "#",
        "Frames",
        "Time",
        "Device",
        "LUN",
        "Tag",
        "Command",
        "LBA",
        "Blocks",
        "Data",
        "Status",
        "Latency ms",
    ):
        table.add_column(column)
    for i, c in enumerate(commands, 1):
        status = {None: "pending", 0: "passed", 1: "failed", 2: "phase error"}.get(
            c.csw_status, str(c.csw_status)
        )
        table.add_row(
            str(i),
            _frames(c.frame, c.response_frame),
            f"{c.ts - t0:.6f}" if c.ts is not None else "",
            f"{c.busnum}:{c.devnum}" + (f" ({c.busid})" if c.busid else ""),
            str(c.lun),
            f"0x{c.tag:08x}",
            c.name or "?",
            "" if c.logical_block_address is None else str(c.logical_block_address),
            "" if c.blocks is None else str(c.blocks),
            f"{c.data_bytes}/{c.data_transfer_length}",
            status if c.csw_status in (None, 0) else f"[red]{status}[/]",
            _ms(c.latency),
        )
    return table


def _print_summary(console: Console, analysis: Analysis, summary: dict[str, Any]) -> None:
    lat = summary["latency"]
    console.print(f"[bold]{analysis.source}[/]: {analysis.frames} frames, {analysis.records} records "
                  f"({', '.join(sorted(analysis.protocols)) or 'nothing USB'})")  # fmt: skip
    console.print(
        f"URBs {summary['urbs']}: completed {summary['completed']}, pending {summary['pending']}, "
        f"unlinked {summary['unlinked']}, errors {summary['errors']}"
        + (
            " (" + ", ".join(f"{k} x{v}" for k, v in summary["errors_by_status"].items()) + ")"
            if summary["errors"]
            else ""
        )
    )
    console.print(f"bytes IN {summary['bytes_in']}, OUT {summary['bytes_out']}")
    console.print(
        f"latency ms: p50 {_ms(lat['p50']) or '-'}, p90 {_ms(lat['p90']) or '-'}, p99 {_ms(lat['p99']) or '-'}, "
        f"max {_ms(lat['max']) or '-'} ({lat['count']} completed URBs)"
    )
    if summary["endpoints"]:
        table = Table(title="per endpoint", header_style="bold")
        for column in ("Device EP", "URBs", "Bytes", "Errors"):
            table.add_column(column, justify="right" if column != "Device EP" else "left")
        for key, entry in summary["endpoints"].items():
            table.add_row(key, str(entry["urbs"]), str(entry["bytes"]), str(entry["errors"]))
        console.print(table)
    scsi = summary.get("scsi")
    if scsi:
        slat = scsi["latency"]
        console.print(
            f"SCSI commands {scsi['commands']} (failed {scsi['failed']}): "
            + ", ".join(f"{name} x{n}" for name, n in sorted(scsi["by_opcode"].items()))
        )
        console.print(f"SCSI latency ms: p50 {_ms(slat['p50']) or '-'}, p90 {_ms(slat['p90']) or '-'}, "
                      f"p99 {_ms(slat['p99']) or '-'}")  # fmt: skip


@click.command("dissect")
@click.argument("capture", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--json", "as_json", is_flag=True, help="JSON lines (one object per transaction) instead of a table."
)
@click.option(
    "--summary", is_flag=True, help="Totals instead of rows: bytes, URBs, errors, latency p50/p90/p99."
)
@click.option("--scsi", "scsi", is_flag=True, help="List SCSI commands (CBW to CSW) instead of URBs.")
@click.option(
    "--device", help="Only this device, BUS:DEV (usbmon bus:address; USB/IP devid >> 16 : devid & 0xffff)."
)
@click.option("--busid", help="Only USB/IP connections that imported this busid, e.g. 1-1.")
@click.option(
    "--endpoint", help="Only this endpoint address, e.g. 0x81 or 0x02; 0 is the control pipe (both ways)."
)
@click.option(
    "--scsi-opcode", help="Only what belongs to this SCSI command: a name (READ_10) or a number (0x28)."
)
@click.option(
    "--port",
    "ports",
    multiple=True,
    type=int,
    default=(3240,),
    show_default=True,
    help="TCP port carrying USB/IP.",
)
@click.option(
    "--lenient",
    is_flag=True,
    help="A USB/IP connection that breaks the protocol is a warning (rest of it skipped), not an error.",
)
@click.option("--limit", type=click.IntRange(min=0), help="Print at most this many rows.")
def dissect_command(
    capture: Path,
    as_json: bool,
    summary: bool,
    scsi: bool,
    device: str | None,
    busid: str | None,
    endpoint: str | None,
    scsi_opcode: str | None,
    ports: tuple[int, ...],
    limit: int | None,
    lenient: bool,
) -> None:
    """Pair the requests and responses of a usbmon or USB/IP capture (pcap, pcapng) and print them."""
    dev = _parse_device(device)
    ep = _parse_endpoint(endpoint)
    op = _parse_opcode(scsi_opcode)
    if scsi and ep is not None:
        raise click.BadParameter(
            "SCSI commands span endpoints; use --endpoint without --scsi", param_hint="--endpoint"
        )
    analysis = analyze(capture, ports=ports, strict=not lenient)
    err = Console(stderr=True)
    for warning in analysis.warnings:
        err.print(f"[yellow]vusb: warning:[/] {warning}", highlight=False)
    transactions = filter_transactions(
        analysis.transactions, device=dev, busid=busid, endpoint=ep, scsi_opcode=op
    )
    commands = filter_commands(analysis.scsi_commands, device=dev, busid=busid, scsi_opcode=op)
    t0 = next((t.ts for t in analysis.transactions if t.ts is not None), 0.0)
    if summary:
        result = summarize(transactions, commands)
        if as_json:
            result["source"] = analysis.source
            result["frames"] = analysis.frames
            result["records"] = analysis.records
            click.echo(json.dumps(result))
        else:
            _print_summary(Console(), analysis, result)
        return
    rows: list[Any] = commands if scsi else transactions
    if limit is not None:
        rows = rows[:limit]
    if as_json:
        out = sys.stdout
        for row in rows:
            out.write(json.dumps(row.to_dict()) + "\n")
        return
    console = Console()
    if not rows:
        console.print(
            "no transactions"
            + (" match the filters" if (dev, busid, ep, op) != (None, None, None, None) else "")
        )
        return
    console.print(_commands_table(rows, t0) if scsi else _transactions_table(rows, t0))


__all__ = ["describe", "dissect_command", "filter_commands", "filter_transactions", "opcode_name"]
