"""Shared pytest set-up for vusb's tests.

The VM plugin runs tests marked `kernel` inside one QEMU guest boot per pytest run (see tools/vm/).
"""

pytest_plugins = ["tools.vm.pytest_plugin"]
