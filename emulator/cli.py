"""The `vusb` command line: one click group, one sub-command per job.

User mistakes and deliberate errors (`VusbError`) become one line on stderr and exit status 1, never a
traceback; `--verbose` turns on protocol-level logging.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click
from rich.console import Console
from rich.logging import RichHandler

from emulator import __version__
from emulator.errors import VusbError

err_console = Console(stderr=True)


class VusbGroup(click.Group):
    """A click group that reports `VusbError` (and OSError from user-supplied paths) as one clear line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VusbError as exc:
            err_console.print(f"[bold red]vusb: error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(1)
        except KeyboardInterrupt:
            err_console.print("vusb: interrupted")
            sys.exit(130)


@click.group(cls=VusbGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vusb")
@click.option("-v", "--verbose", count=True, help="Log protocol events (-vv for every message).")
def cli(verbose: int) -> None:
    """vusb: USB devices over IP — serve, import, bridge, record and replay USB devices."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=err_console, show_time=False, show_path=False)],
    )


def _register_commands() -> None:
    """Sub-commands live next to what they drive; each module exports one click command or group."""
    from emulator.cli_serve import serve_command

    cli.add_command(serve_command)

    from emulator.cli_bench import bench_command

    cli.add_command(bench_command)

    from captures.cli import dissect_command

    cli.add_command(dissect_command)

    from emulator.cli_host import register as register_host_commands

    register_host_commands(cli)  # list, info, disk dump|write, demo

    from gadgets.cli import attach_command, detach_command, emulate_command, port_command

    for command in (emulate_command, attach_command, port_command, detach_command):
        cli.add_command(command)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Entry point: click usage mistakes also become one line (`vusb: error: ...`), exit status 2."""
    try:
        code = cli.main(args=argv, prog_name="vusb", standalone_mode=False)
    except click.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        err_console.print(
            f"[bold red]vusb: error:[/] {exc.format_message()}{hint}", highlight=False, soft_wrap=True
        )
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        err_console.print(
            f"[bold red]vusb: error:[/] {exc.format_message()}", highlight=False, soft_wrap=True
        )
        sys.exit(exc.exit_code)
    except click.Abort:
        err_console.print("vusb: interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
