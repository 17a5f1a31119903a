"""Developer and CI tools for vusb (not installed with the package): the kernel VM harness, benchmarks."""
