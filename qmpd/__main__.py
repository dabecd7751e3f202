"""Entry point: ``qmpd`` and ``python -m qmpd``."""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from qmpd import logs
from qmpd.cli import Config, Exit, parse_args
from qmpd.errors import ConfigError


def _daemonize() -> int:
    """Fork into the background; the parent exits once the child is ready.

    Returns the write end of the readiness pipe in the daemon process.
    """
    read_fd, write_fd = os.pipe()
    if os.fork() > 0:
        os.close(write_fd)
        chunks = []
        while True:
            chunk = os.read(read_fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
        status = b"".join(chunks)
        if status.startswith(b"\0"):
            sys.stdout.write(f"{logs.PROG}: info: " + status[1:].decode(errors="replace"))
            sys.stdout.flush()
            os._exit(0)
        sys.stderr.write(status.decode(errors="replace") or "qmpd: daemon failed to start\n")
        os._exit(1)
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    # With --log-file, what the daemon prints (HMP qemu-io output) is kept there.
    os.dup2(logs.log_fd() or devnull, 1)
    os.close(devnull)
    return write_fd


async def _run(config: Config, ready_fd: int | None) -> int:
    from qmpd.daemon import Daemon

    daemon = Daemon(config)
    # What start-up allocated (modules, the schema) lives as long as the
    # daemon: kept out of every later collection, which then scans only what
    # the daemon allocates (a full one during a burst of blockdev-add scanned
    # it all again: about a tenth of each add's CPU time, issue 10).
    gc.freeze()
    gc.enable()  # start-up's heavy part is over (see main)
    return await daemon.run(ready_fd)


def main(argv: Sequence[str] | None = None) -> int:
    # Start-up allocates much and frees little: collecting while the daemon's
    # modules load wastes about a tenth of the time to listening (issue 10).
    gc.disable()
    try:
        return _main(argv)
    finally:
        gc.enable()


def _main(argv: Sequence[str] | None) -> int:
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
    except Exit as done:
        sys.stdout.write(done.text)
        return 0
    except ConfigError as exc:
        print(f"qmpd: {exc}", file=sys.stderr)
        return 1
    try:
        logs.setup(config.log_level, config.log_file)
    except OSError as exc:
        print(f"qmpd: --log-file {config.log_file}: {exc.strerror}", file=sys.stderr)
        return 1
    for warning in config.ignored:
        logging.getLogger("qmpd").warning("%s", warning)
    try:
        loop_factory = _loop_factory(config.event_loop)
    except ConfigError as exc:
        print(f"qmpd: {exc}", file=sys.stderr)
        return 1
    ready_fd = _daemonize() if config.daemonize else None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_run(config, ready_fd))
    except ConfigError as exc:
        print(f"qmpd: {exc}", file=sys.stderr)
        return 1


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when asked for, or when installed and not refused; else asyncio's."""
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")  # optional: not a dependency
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("--event-loop uvloop: uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


if __name__ == "__main__":
    sys.exit(main())
