"""Run commands, and the project's `kernel`-marked tests, inside a QEMU guest of Debian's packaged kernel.

The host kernel has no USB; the guest has dummy_hcd, configfs gadgets, usbip and usb-storage as modules.
`python -m tools.vm prepare` caches the kernel and initramfs; `run_in_vm(cmd)` boots, runs, powers off.
This package imports only the standard library, so it stays cheap inside the (12-15x slower) TCG guest.
"""

from tools.vm.errors import PrepareError, VmBootError, VmError, VmNotPrepared, VmTimeout
from tools.vm.runner import VmResult, run_in_vm

__all__ = ["PrepareError", "VmBootError", "VmError", "VmNotPrepared", "VmResult", "VmTimeout", "run_in_vm"]
