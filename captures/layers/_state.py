"""Memory the stateful dissectors keep between frames, bounded so a long capture cannot grow it without limit.

USB/IP and usbmon are stateful the way Wireshark's conversation data is: a RET_SUBMIT does not say which
direction its URB had, a usbmon completion does not repeat the SETUP packet it answers. The layers remember
what they saw earlier in the same capture, in file order, in these dictionaries.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedDict(OrderedDict[K, V], Generic[K, V]):
    """An insertion-ordered dict that forgets its oldest entries beyond `limit`."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: K, value: V) -> None:
        if key in self:
            self.move_to_end(key)
        super().__setitem__(key, value)
        while len(self) > self.limit:
            self.popitem(last=False)
