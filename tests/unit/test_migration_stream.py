"""QEMU's migration stream: qmpd's writer and reader against streams and answers recorded from QEMU 7.2.

The records live in tests/migration_data/ (see its README.md); no QEMU is needed here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpd.migration.stream import (
    EOF,
    MIGRATION_CAPABILITIES,
    VM_DESCRIPTION,
    Command,
    Complete,
    Configuration,
    Event,
    GlobalState,
    Header,
    MigCommand,
    MigrationStreamError,
    ReturnPathReader,
    RPMessage,
    RPMessageType,
    Section,
    SectionType,
    StreamReader,
    StreamWarning,
    StreamWriter,
    TimerState,
    VMDescription,
    encode_rp_message,
)
from qmpd.runstate import RunState
from tests.migration_data.capture import variants
from tests.migration_data.streams import build_stream, parse_stream

DATA = Path(__file__).resolve().parent.parent / "migration_data"
PROG = "qemu-system-x86_64"

CAPTURES: dict[str, dict[str, Any]] = json.loads((DATA / "captures.json").read_text())
REFUSALS: dict[str, dict[str, Any]] = json.loads((DATA / "refusals.json").read_text())
TRUNCATIONS: dict[str, list[dict[str, Any]]] = json.loads((DATA / "truncations.json").read_text())
#: Captures whose stream the writer does not produce (block migration, snapshots).
NOT_WRITTEN = {"block", "background-snapshot"}


@cache
def capture(name: str) -> bytes:
    return (DATA / "captures" / f"{name}.bin").read_bytes()


def caps_of(name: str) -> dict[str, bool]:
    return {c: True for c in CAPTURES[name].get("caps", [])}


@cache
def made_variants() -> dict[str, tuple[bytes, list[str]]]:
    return variants(capture("running"), capture("unix-return-path"))


def outcome(data: bytes, caps: list[str] | dict[str, bool], chunks: int = 0) -> dict[str, Any]:
    """What QEMU's destination would do with ``data``, as capture.py records it."""
    reader = StreamReader({c: True for c in caps})
    events: list[Event] = []
    try:
        if chunks:
            for i in range(0, len(data), chunks):
                events += reader.feed(data[i : i + chunks])
        else:
            events += reader.feed(data)
        events += reader.close()
    except MigrationStreamError as exc:
        warnings = "".join(f"{PROG}: {w}\n" for w in reader.warnings)
        return {"exit": 1, "stderr": warnings + exc.render(PROG)}
    assert isinstance(events[-1], Complete)
    states = [e.runstate for e in events if isinstance(e, GlobalState)]
    warnings = "".join(f"{PROG}: {e.message}\n" for e in events if isinstance(e, StreamWarning))
    return {"exit": 0, "stderr": warnings, "runstate": states[-1] if states else "running"}


def expected(record: dict[str, Any]) -> dict[str, Any]:
    out = {"exit": record["exit"], "stderr": record["stderr"]}
    if "runstate" in record:
        out["runstate"] = record["runstate"]
    return out


# ---------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------


def timer_value_offsets(data: bytes) -> set[int]:
    """Offsets of the timer section's two int64 values in a stream."""
    header = b"\x04\x00\x00\x00\x00\x05timer\x00\x00\x00\x00\x00\x00\x00\x02"
    start = data.index(header) + len(header)
    return set(range(start, start + 8)) | set(range(start + 16, start + 24))


@pytest.mark.parametrize("name", sorted(set(CAPTURES) - NOT_WRITTEN))
def test_writer_reproduces_capture_byte_for_byte(name: str) -> None:
    data = capture(name)
    parsed = parse_stream(data, capabilities=caps_of(name))
    assert parsed.runstate == CAPTURES[name]["runstate"]
    assert build_stream(parsed.effective_runstate, parsed.timer, capabilities=caps_of(name)) == data
    # Without the timer values, only those 16 bytes differ.
    ours = build_stream(CAPTURES[name]["runstate"], capabilities=caps_of(name))
    assert len(ours) == len(data)
    assert {i for i in range(len(data)) if ours[i] != data[i]} <= timer_value_offsets(data)


def test_only_timer_values_change_between_runs() -> None:
    runs = [capture(n) for n in ("running", "running-2", "running-3", "events", "qcow2-node",
                                 "unix", "cont-after-S", "late-block-activate",
                                 "pause-before-switchover")]
    offsets = timer_value_offsets(runs[0])
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        assert {i for i in range(len(other)) if other[i] != runs[0][i]} <= offsets
    assert TimerState.decode(bytes(24)) == TimerState(0, 0)
    assert parse_stream(capture("prelaunch")).timer == TimerState(0, 0)


def test_writer_phases_and_values() -> None:
    writer = StreamWriter()
    timer = TimerState(cpu_ticks_offset=123456789, cpu_clock_offset=-5)
    setup = writer.setup()
    assert setup.startswith(b"QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x04none\x01")
    stream = setup + writer.complete("paused", timer)
    assert stream == build_stream("paused", timer)
    parsed = parse_stream(stream)
    assert (parsed.runstate, parsed.timer, parsed.machine_type) == ("paused", timer, "none")
    assert parsed.vmdesc == VM_DESCRIPTION
    assert json.loads(VM_DESCRIPTION)["devices"][1]["name"] == "globalstate"
    with pytest.raises(ValueError):
        build_stream("x" * 100)


@given(
    runstate=st.sampled_from([s.value for s in RunState]),
    ticks=st.integers(-(2**63), 2**63 - 1),
    clock=st.integers(-(2**63), 2**63 - 1),
    caps=st.sets(st.sampled_from(["return-path", "postcopy-ram", "dirty-bitmaps",
                                  "x-ignore-shared", "events"])),
)
def test_written_streams_read_back(runstate: str, ticks: int, clock: int, caps: set[str]) -> None:
    flags = {c: True for c in caps}
    data = build_stream(runstate, TimerState(ticks, clock), capabilities=flags)
    parsed = parse_stream(data, capabilities=flags)
    assert parsed.runstate == runstate
    assert parsed.timer == TimerState(ticks, clock)
    assert parsed.return_path == ("return-path" in caps or "postcopy-ram" in caps)
    assert parsed.configuration.capabilities == (("x-ignore-shared",) if "x-ignore-shared" in caps else None)


# ---------------------------------------------------------------------------
# Reader: captures
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CAPTURES))
def test_reader_parses_every_capture(name: str) -> None:
    data = capture(name)
    record = CAPTURES[name]
    parsed = parse_stream(data, capabilities=caps_of(name))
    assert parsed.version == 3
    assert parsed.machine_type == "none"
    assert parsed.runstate == record["runstate"]
    assert parsed.vmdesc == VM_DESCRIPTION
    assert parsed.warnings == ()
    assert [type(e) for e in parsed.events[-3:]] == [EOF, VMDescription, Complete]
    # What QEMU's destination made of it, with and without -S.
    assert record["destination"]["runstate"] == record["runstate"]
    assert record["destination_with_S"]["runstate"] == (
        "paused" if record["runstate"] == "running" else record["runstate"])
    rp_expected = "return-path" in record.get("caps", []) or "postcopy-ram" in record.get("caps", [])
    assert parsed.return_path == rp_expected
    if rp_expected:
        pings = [c.ping_value for c in parsed.commands if c.command == MigCommand.PING]
        assert pings == [1]


def test_events_in_order() -> None:
    reader = StreamReader()
    data = capture("unix-return-path")
    assert reader.feed(data[:7]) == []
    events = reader.feed(data[7:8])
    assert events == [Header(3)]
    events = reader.feed(data[8:])
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Configuration", "Command", "Command", "Section", "Section", "Section",
                     "Section", "GlobalState", "EOF", "VMDescription", "Complete"]
    assert events[0] == Configuration("none")
    assert events[1] == Command(MigCommand.OPEN_RETURN_PATH, b"")
    assert isinstance(events[2], Command) and events[2].name == "PING"
    ram = events[3]
    assert ram == Section(SectionType.START, 2, "ram", 0, 4, struct.pack(">QQ", 4, 0x10))
    assert events[7] == GlobalState("running")
    assert reader.done and reader.offset == len(data)
    assert reader.feed(b"more") == [] and reader.trailing == 4
    assert reader.close() == []


def test_complete_waits_for_the_whole_description() -> None:
    data = capture("running")
    reader = StreamReader()
    events = reader.feed(data[:-1])
    assert EOF() in events and not reader.done
    assert reader.feed(data[-1:]) == [VMDescription(VM_DESCRIPTION, len(VM_DESCRIPTION)), Complete()]


def test_failure_is_sticky() -> None:
    reader = StreamReader()
    with pytest.raises(MigrationStreamError) as first:
        reader.feed(b"QEVX")
    assert str(first.value) == "Not a migration stream\nload of migration failed: Invalid argument"
    assert first.value.errno == 22 and first.value.reason == "Not a migration stream"
    with pytest.raises(MigrationStreamError) as again:
        reader.feed(b"more")
    assert again.value is first.value
    with pytest.raises(MigrationStreamError):
        reader.close()


def test_empty_stream_is_not_a_migration_stream() -> None:
    # Over a socket QEMU reads zeros and says so; over exec: with nothing
    # written it never starts reading (recorded as a hang).
    assert REFUSALS["empty-magic"].get("hang")
    with pytest.raises(MigrationStreamError, match=r"^Not a migration stream"):
        StreamReader().close()


def test_render_keeps_qemus_unprefixed_lines() -> None:
    data, _ = made_variants()["block-device"]
    with pytest.raises(MigrationStreamError) as exc:
        parse_stream(data)
    assert exc.value.render("qmpd") == (
        "Error unknown block device disk\n"
        "qmpd: error while loading state for instance 0x0 of device 'block'\n"
        "qmpd: load of migration failed: Invalid argument\n")


# ---------------------------------------------------------------------------
# Reader: QEMU's answers, recorded
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(n for n in REFUSALS if not REFUSALS[n].get("hang")))
def test_reader_answers_like_qemu(name: str) -> None:
    record = REFUSALS[name]
    data, caps = made_variants()[name]
    assert hashlib.sha256(data).hexdigest() == record["sha256"], "stale record: rerun capture.py"
    assert caps == record["destination_caps"]
    assert outcome(data, caps) == expected(record)


@pytest.mark.parametrize("name", sorted(TRUNCATIONS))
def test_truncation_at_every_offset_like_qemu(name: str) -> None:
    data = capture(name)
    caps = CAPTURES[name].get("caps", [])
    checked = 0
    for rng in TRUNCATIONS[name]:
        if rng.get("hang"):  # offset 0 through exec:, see above
            continue
        for n in range(rng["from"], rng["to"] + 1):
            assert outcome(data[:n], caps) == expected(rng), f"cut at {n}"
            checked += 1
    assert checked == len(data)


def test_truncation_is_refused_up_to_eof_byte() -> None:
    data = capture("running")
    eof = len(data) - len(VM_DESCRIPTION) - 5 - 1  # the EOF byte
    assert data[eof] == SectionType.EOF and data[eof + 1] == SectionType.VMDESCRIPTION
    for n in range(eof + 1):
        with pytest.raises(MigrationStreamError):
            parse_stream(data[:n])
    # From the EOF byte on, QEMU accepts a missing or cut description.
    assert parse_stream(data[: eof + 1]).warnings == ("Expected vmdescription section, but got 0",)
    assert parse_stream(data[: eof + 10]).vmdesc is None


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

STREAMS = sorted(CAPTURES)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(STREAMS), cuts=st.lists(st.integers(0, 900), max_size=12))
def test_any_split_gives_the_same_events(name: str, cuts: list[int]) -> None:
    data = capture(name)
    whole = StreamReader(caps_of(name))
    expected_events = whole.feed(data) + whole.close()
    reader = StreamReader(caps_of(name))
    events: list[Event] = []
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        events += reader.feed(data[a:b])
    events += reader.close()
    assert events == expected_events


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(STREAMS), data=st.data())
def test_any_truncation_is_detected(name: str, data: st.DataObject) -> None:
    stream = capture(name)
    eof = len(stream) - len(VM_DESCRIPTION) - 6
    n = data.draw(st.integers(0, eof))
    step = data.draw(st.integers(1, 64))
    reader = StreamReader(caps_of(name))
    with pytest.raises(MigrationStreamError) as exc:
        for i in range(0, n, step):
            reader.feed(stream[i : min(n, i + step)])
        reader.close()
    assert exc.value.lines[-1].startswith("load of migration failed: ")
    assert not reader.done


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(n for n in REFUSALS if not REFUSALS[n].get("hang"))),
       chunk=st.integers(1, 40))
def test_refusals_do_not_depend_on_chunking(name: str, chunk: int) -> None:
    data, caps = made_variants()[name]
    assert outcome(data, caps, chunks=chunk) == expected(REFUSALS[name])


@settings(max_examples=100)
@given(noise=st.binary(max_size=64), at=st.integers(0, 746))
def test_garbage_never_crashes_the_reader(noise: bytes, at: int) -> None:
    data = capture("running")
    broken = data[:at] + noise + data[at + len(noise):]
    reader = StreamReader()
    try:
        events = reader.feed(broken) + reader.close()
    except MigrationStreamError as exc:
        assert exc.lines[-1].startswith("load of migration failed: ")
    else:
        assert isinstance(events[-1], Complete)


# ---------------------------------------------------------------------------
# Return path
# ---------------------------------------------------------------------------


def test_return_path_messages_like_qemus() -> None:
    recorded = bytes.fromhex(CAPTURES["unix-return-path"]["return_path_bytes"])
    assert recorded == (encode_rp_message(RPMessageType.PONG, struct.pack(">I", 1))
                        + encode_rp_message(RPMessageType.SHUT, struct.pack(">I", 0)))
    reader = ReturnPathReader()
    messages: list[RPMessage] = []
    for byte in recorded:
        messages += reader.feed(bytes([byte]))
    reader.close()
    assert [(m.type, m.value) for m in messages] == [(RPMessageType.PONG, 1), (RPMessageType.SHUT, 0)]
    with pytest.raises(MigrationStreamError):
        ReturnPathReader().feed(b"\x00\x01\x00\x02\x00\x00")
    half = ReturnPathReader()
    half.feed(recorded[:5])
    with pytest.raises(MigrationStreamError):
        half.close()


def test_capability_list_is_qemu_72s() -> None:
    assert len(MIGRATION_CAPABILITIES) == 21
    assert {"events", "return-path", "late-block-activate", "pause-before-switchover"} <= set(
        MIGRATION_CAPABILITIES)


@pytest.mark.parametrize("caps", [
    {},
    {"return-path": True},
    {"dirty-bitmaps": True},
    {"return-path": True, "dirty-bitmaps": True, "late-block-activate": True},
])
def test_incoming_rehearses_parsing_a_whole_stream(caps: dict[str, bool]) -> None:
    """Issue 10: migrate-incoming parses a stream like the one to come, to
    its end, every time (so the parser's code is warm in the downtime)."""
    from qmpd.migration.incoming import _REHEARSALS, _rehearse_parsing
    from qmpd.migration.state import MigrationSettings

    settings = MigrationSettings()
    settings.capabilities.update(caps)
    assert _rehearse_parsing(settings.capabilities) == _REHEARSALS
