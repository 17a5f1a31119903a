"""Test counterparts for the userspace host: vusb's own server on loopback, in a background thread or in a
child process (which a test can SIGKILL), and a scripted fake server for protocol abuse."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

from emulator.devices.base import Device
from emulator.server import UsbipServer
from emulator.sync_host import LoopThread

REPO = Path(__file__).resolve().parent.parent


class ServerThread:
    """A `UsbipServer` running on its own loop thread, for blocking tests (pyusb, CLI)."""

    def __init__(self, devices: Sequence[Device]) -> None:
        self.loop = LoopThread("test-server")
        self.server = UsbipServer(list(devices), host="127.0.0.1", port=0)
        self.loop.run(self.server.start(), 10)
        self.port = self.server.port

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.run(self.server.close(), 10)
        self.loop.close()


@contextlib.contextmanager
def server_thread(devices: Sequence[Device]) -> Iterator[ServerThread]:
    running = ServerThread(devices)
    try:
        yield running
    finally:
        running.close()


_CHILD = textwrap.dedent("""
    import asyncio, sys
    from emulator.server import UsbipServer
    from emulator.devices.mass_storage import mass_storage_device

    async def main():
        server = UsbipServer([mass_storage_device(sys.argv[1])], host="127.0.0.1", port=0)
        await server.start()
        print(server.port, flush=True)
        await server.serve_forever()

    asyncio.run(main())
""")


@contextlib.contextmanager
def server_process(image: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """vusb's server exporting `image` as a thumb drive, in a child process; yields (process, port)."""
    process = subprocess.Popen([sys.executable, "-c", _CHILD, str(image)], stdout=subprocess.PIPE, text=True,
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the server process did not start (said {line!r})")
        yield process, int(line)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(10)


async def fake_server(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
                      ) -> tuple[asyncio.Server, int]:
    """A TCP server on 127.0.0.1 whose connections `handler` scripts byte by byte."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]
