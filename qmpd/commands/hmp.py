"""human-monitor-command: ``info status`` and the ``qemu-io NODE "CMD"`` form.

Like qemu-system, qemu-io's own output (``wrote 4096/4096 bytes at offset
0`` ...) goes to the daemon's standard output and the command returns an
empty string; errors that the monitor itself reports come back in the
reply, each line ending in CR LF.
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any

from qmpd.block.driver import BlockDriverError
from qmpd.errors import QMPError
from qmpd.qmp.dispatch import CommandContext, command
from qmpd.runstate import RunState

if TYPE_CHECKING:
    from qmpd.block.graph import BlockNode

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
             "e": 1 << 60}
#: Compiled on first use (re's cache), not at start-up (issue 10).
_NUMBER = r"(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]+)?)([bkmgtpeBKMGTPE]?)"


class _Usage(Exception):
    pass


def parse_size(text: str) -> int:
    m = re.fullmatch(_NUMBER, text)
    if m is None:
        raise _Usage(f"invalid numeric argument {text}")
    number, suffix = m.groups()
    value = int(number, 16) if number[:2].lower() == "0x" else float(number)
    return int(value * _SUFFIXES[suffix.lower()])


def cvtstr(value: float) -> str:
    """qemu-io's human sizes: "4 KiB", "40 bytes", "1.464844 KiB"."""
    suffix = " bytes"
    for unit, name in ((1 << 60, " EiB"), (1 << 50, " PiB"), (1 << 40, " TiB"),
                       (1 << 30, " GiB"), (1 << 20, " MiB"), (1 << 10, " KiB")):
        if value >= unit:
            value /= unit
            suffix = name
            break
    text = f"{value:f}"
    if ".000" in text:
        return text[: text.index(".000")] + suffix
    return text + suffix


def _rate(value: float) -> str:
    for unit, suffix in ((1 << 30, " GiB"), (1 << 20, " MiB"), (1 << 10, " KiB")):
        if value >= unit:
            return f"{value / unit:.3f}{suffix}"
    return f"{value:.3f} bytes"


def report(verb: str, length: int, offset: int, seconds: float) -> str:
    seconds = max(seconds, 1e-9)
    rate = _rate(length / seconds)
    whole = int(seconds)
    hundredths = int((seconds - whole) * 100)
    return (
        f"{verb} {length}/{length} bytes at offset {offset}\n"
        f"{cvtstr(length)}, 1 ops; {whole:02d}.{hundredths:02d} sec "
        f"({rate}/sec and {1 / seconds:.4f} ops/sec)\n"
    )


def dump_buffer(data: bytes, offset: int) -> str:
    lines = []
    for i in range(0, len(data), 16):
        chunk = data[i : i + 16]
        hexpart = "".join(f"{b:02x} " for b in chunk)
        text = "".join(chr(b) if chr(b).isalnum() and b < 0x80 else "." for b in chunk)
        lines.append(f"{offset + i:08x}:  {hexpart} {text}\n")
    return "".join(lines)


#: QEMU's BDRV_REQUEST_MAX_BYTES: the largest request qemu-io sends at once.
REQUEST_MAX_BYTES = 2147483136


async def run_qemu_io(node: BlockNode, line: str) -> str:
    """One qemu-io command on ``node``; returns what qemu-io prints."""
    argv = shlex.split(line)
    if not argv:
        return ""
    name, args = argv[0], argv[1:]
    opts: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") and len(arg) > 1 and not arg[1].isdigit():
            flag = arg[1:]
            if flag == "P":
                i += 1
                opts["P"] = parse_size(args[i]) & 0xFF
            else:
                for ch in flag:
                    opts[ch] = True
        else:
            positional.append(arg)
        i += 1
    start = time.perf_counter()
    if name in ("read", "r", "write", "w", "discard") and len(positional) >= 2:
        # qemu-io refuses what the block layer would split (BDRV_REQUEST_MAX_BYTES),
        # and a 3G read would otherwise hold 3G of buffers (twice, with -P).
        if parse_size(positional[1]) > REQUEST_MAX_BYTES:
            without = " without -n" if name in ("write", "w") else ""
            return (f"length cannot exceed {REQUEST_MAX_BYTES}{without}, "
                    f"given {positional[1]}\n")
    if name in ("read", "r"):
        offset, length = (parse_size(p) for p in positional[:2])
        try:
            data = await node.read(offset, length)
        except (BlockDriverError, OSError) as exc:
            return f"read failed: {_errno_text(exc)}\n"
        out = ""
        if "P" in opts and data != bytes([opts["P"]]) * length:
            out += f"Pattern verification failed at offset {offset}, {length} bytes\n"
        if opts.get("v"):
            out += dump_buffer(data, offset)
        if not opts.get("q"):
            out += report("read", length, offset, time.perf_counter() - start)
        return out
    if name in ("write", "w"):
        offset, length = (parse_size(p) for p in positional[:2])
        try:
            if opts.get("z"):
                await node.write_zeroes(offset, length, may_unmap=bool(opts.get("u")),
                                        fua=bool(opts.get("f")))
            else:
                await node.write(offset, bytes([opts.get("P", 0xCD)]) * length,
                                 fua=bool(opts.get("f")))
        except (BlockDriverError, OSError) as exc:
            return f"write failed: {_errno_text(exc)}\n"
        if opts.get("q"):
            return ""
        return report("wrote", length, offset, time.perf_counter() - start)
    if name == "discard":
        offset, length = (parse_size(p) for p in positional[:2])
        try:
            await node.discard(offset, length)
        except (BlockDriverError, OSError) as exc:
            return f"discard failed: {_errno_text(exc)}\n"
        if opts.get("q"):
            return ""
        return report("discard", length, offset, time.perf_counter() - start)
    if name == "flush":
        await node.flush()
        return ""
    return f'command "{name}" not found\n'


def _errno_text(exc: BlockDriverError | OSError) -> str:
    errno = exc.errno or 5
    return {1: "Operation not permitted", 5: "Input/output error", 28: "No space left on device",
            95: "Operation not supported", 123: "No medium found"}.get(errno, "Input/output error")


def _split_hmp(line: str) -> tuple[str, str]:
    line = line.strip()
    name, _, rest = line.partition(" ")
    return name, rest.strip()


@command("human-monitor-command")
async def human_monitor_command(ctx: CommandContext, args: dict[str, Any]) -> str:
    name, rest = _split_hmp(args["command-line"])
    services = ctx.services
    if name == "info" and rest == "status":
        state = services.vm.state
        text = "VM status: " + ("running" if state == RunState.RUNNING else "paused")
        if state not in (RunState.RUNNING, RunState.PAUSED):
            text += f" ({state.value})"
        return text + "\r\n"
    if name != "qemu-io":
        return f"unknown command: '{name}'\r\n"
    try:
        words = shlex.split(rest)
    except ValueError:
        words = []
    if words and words[0] == "-d":
        words = words[1:]
    if len(words) != 2:
        return (
            "qemu-io: extraneous characters at the end of line\r\n"
            'Try "help qemu-io" for more information\r\n'
        )
    device, io_command = words
    try:
        node = services.block.find(None, device)
    except QMPError:
        return f"Error: Cannot find device='' nor node-name='{device}'\r\n"
    if io_command.split()[:1] and io_command.split()[0] in ("write", "w", "discard"):
        if node.read_only or not node.active:
            return "Block node is read-only\r\n"
    try:
        output = await run_qemu_io(node, io_command)
    except (_Usage, ValueError, IndexError) as exc:
        output = f"{exc}\n"
    sys.stdout.write(output)
    sys.stdout.flush()
    return ""
