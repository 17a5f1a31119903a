"""The root of vusb's exception hierarchy.

Every error vusb raises on purpose derives from `VusbError`, so the CLI can turn any of them into one clear
line and a non-zero exit code; anything else is a bug and keeps its traceback.
"""


class VusbError(Exception):
    """Base of every deliberate vusb error (bad input, unreachable peer, missing kernel module, ...)."""
