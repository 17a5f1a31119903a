"""`python -m tools.vm prepare | run [...] -- CMD ... | status` (run from the repository root).

`run` streams the guest command's stdout/stderr, then exits with the guest command's exit status; harness
failures are one line plus the console tail, with status 124 for a timeout and 1 for anything else.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tools.vm.errors import VmError, VmTimeout


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.vm", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the harness does")
    sub = parser.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="fetch Debian's kernel and build the initramfs (cached)")
    prep.add_argument("--force", action="store_true", help="unpack the kernel again even if cached")
    run = sub.add_parser("run", help="boot a guest and run CMD in it (after `--`)")
    run.add_argument("--timeout", type=float, default=600, help="seconds before the guest is killed (600)")
    run.add_argument("--mem", type=int, default=2048, help="guest memory in MiB (2048)")
    run.add_argument("--smp", type=int, default=None, help="guest vCPUs (default: min(2, host cores))")
    run.add_argument("--env", type=_env_pair, action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--keep", metavar="DIR", help="use DIR (existing, empty) as the share and keep it")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after `--`")
    sub.add_parser("status", help="show the cached kernel, the initramfs and the accelerator")
    return parser


def _run(args: argparse.Namespace) -> int:
    from tools.vm.runner import run_in_vm

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("python -m tools.vm run: no command given (usage: run [options] -- CMD ...)", file=sys.stderr)
        return 2

    def sink(stream: str, text: str) -> None:
        out = sys.stdout if stream == "stdout" else sys.stderr
        out.write(text)
        out.flush()

    res = run_in_vm(
        cmd, timeout=args.timeout, env=dict(args.env), mem_mb=args.mem, smp=args.smp, io_dir=args.keep,
        on_output=sink,
    )  # fmt: skip
    print(
        f"vusb-vm: exit {res.returncode}; boot-to-command {res.boot_seconds:.1f} s, command "
        f"{res.command_seconds:.1f} s, wall {res.wall_seconds:.1f} s ({res.accel})",
        file=sys.stderr,
    )
    return res.returncode


def _prepare(force: bool) -> int:
    import time

    from tools.vm.initramfs import ensure_initramfs
    from tools.vm.kernel import cache_dir, prepare
    from tools.vm.qemu import choose_accel, qemu_binary

    started = time.monotonic()
    kernel = prepare(force=force)
    initrd = ensure_initramfs(kernel)
    accel = choose_accel(qemu_binary(), 2, kernel.vmlinuz, initrd.path, cache_dir())  # probes KVM once
    print(
        f"vusb-vm: guest kernel {kernel.package} {kernel.version}, initramfs {initrd.path.name}, "
        f"accelerator {accel} ({time.monotonic() - started:.1f} s)"
    )
    return 0


def _status() -> int:
    from tools.vm.initramfs import ensure_initramfs
    from tools.vm.kernel import cache_dir, load_prepared
    from tools.vm.qemu import choose_accel, qemu_binary

    kernel = load_prepared()
    initrd = ensure_initramfs(kernel)
    qemu = qemu_binary()
    print(f"cache:     {cache_dir()}")
    print(f"kernel:    {kernel.package} {kernel.version} ({kernel.vmlinuz})")
    print(f"initramfs: {initrd.path} (insmod order: {' '.join(initrd.modules)})")
    print(f"qemu:      {qemu}, accelerator {choose_accel(qemu, 2, kernel.vmlinuz, initrd.path, cache_dir())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.action == "prepare":
            return _prepare(force=args.force)
        if args.action == "run":
            return _run(args)
        return _status()
    except VmTimeout as exc:
        print(f"vusb-vm: error: {exc}", file=sys.stderr)
        return 124
    except VmError as exc:
        print(f"vusb-vm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vusb-vm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
