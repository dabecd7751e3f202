"""Whole streams for tests: build one as a QEMU 7.2 ``-M none`` source sends it,
or read one as its destination would (the product works incrementally)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from qmpd.migration.stream import (
    Command,
    Configuration,
    Event,
    GlobalState,
    Header,
    Section,
    StreamReader,
    StreamWriter,
    TimerState,
    VMDescription,
)
from qmpd.runstate import RunState


def build_stream(runstate: str, timer: TimerState | None = None, *,
                 capabilities: Mapping[str, bool] | None = None) -> bytes:
    """A whole stream as QEMU 7.2 ``-M none`` sends it from ``runstate``."""
    writer = StreamWriter(capabilities)
    return writer.setup() + writer.complete(runstate, timer)




@dataclass(frozen=True)
class ParsedStream:
    """What a complete incoming stream said."""

    version: int
    configuration: Configuration
    #: The source's run state; None when the stream had no globalstate section.
    runstate: str | None
    timer: TimerState | None
    sections: tuple[Section, ...]
    commands: tuple[Command, ...]
    return_path: bool
    vmdesc: bytes | None
    warnings: tuple[str, ...]
    trailing: int
    events: tuple[Event, ...] = field(repr=False, default=())

    @property
    def machine_type(self) -> str:
        return self.configuration.machine_type

    @property
    def effective_runstate(self) -> str:
        """What QEMU's destination goes by: a missing globalstate counts as running."""
        return self.runstate if self.runstate is not None else RunState.RUNNING.value


def parse_stream(data: bytes, *, capabilities: Mapping[str, bool] | None = None) -> ParsedStream:
    """Read a whole stream as a QEMU 7.2 ``-M none`` destination would.

    :raise MigrationStreamError: with QEMU's text, if the destination refuses it.
    """
    reader = StreamReader(capabilities)
    events = reader.feed(data)
    events += reader.close()
    version = 0
    config = Configuration(machine_type="")
    runstate: str | None = None
    timer: TimerState | None = None
    vmdesc: bytes | None = None
    sections: list[Section] = []
    commands: list[Command] = []
    for event in events:
        if isinstance(event, Header):
            version = event.version
        elif isinstance(event, Configuration):
            config = event
        elif isinstance(event, GlobalState):
            runstate = event.runstate
        elif isinstance(event, Section):
            sections.append(event)
            if event.idstr == "timer":
                timer = TimerState.decode(event.payload, event.version_id)
        elif isinstance(event, Command):
            commands.append(event)
        elif isinstance(event, VMDescription):
            vmdesc = event.data
    return ParsedStream(
        version=version, configuration=config, runstate=runstate, timer=timer,
        sections=tuple(sections), commands=tuple(commands),
        return_path=reader.return_path_open, vmdesc=vmdesc,
        warnings=tuple(reader.warnings), trailing=reader.trailing, events=tuple(events),
    )
