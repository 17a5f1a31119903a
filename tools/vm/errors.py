"""The VM harness's exception hierarchy: every deliberate failure names what went wrong and how to fix it."""

from __future__ import annotations

SETUP_HINT = "run `bash tools/setup.sh` (or `python -m tools.vm prepare`) from the repository root"


class VmError(Exception):
    """Base of every error the VM harness raises on purpose."""


class VmNotPrepared(VmError):
    """The guest kernel or initramfs is not in the cache (or a host tool the harness needs is missing)."""


class PrepareError(VmError):
    """Fetching or unpacking the guest kernel failed."""


class VmBootError(VmError):
    """The guest stopped without reporting an exit status: init failed, the kernel panicked, or QEMU failed.

    `console_tail` holds the end of the serial console, where the reason usually is.
    """

    def __init__(self, message: str, console_tail: str = "") -> None:
        super().__init__(message)
        self.console_tail = console_tail


class VmTimeout(VmBootError):
    """The guest did not finish within the timeout and was killed."""

    def __init__(self, message: str, console_tail: str = "", stdout: str = "", stderr: str = "") -> None:
        super().__init__(message, console_tail)
        self.stdout = stdout
        self.stderr = stderr
