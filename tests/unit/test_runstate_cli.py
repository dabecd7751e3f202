"""Run-state table, keyval and command-line parsing."""

from __future__ import annotations

import pytest

from qmpd.cli import HttpConfig, parse_args
from qmpd.errors import ConfigError
from qmpd.keyval import parse_keyval, parse_option
from qmpd.net import InetAddress, UnixAddress
from qmpd.qmp.server import MonitorConfig
from qmpd.runstate import TRANSITIONS, InvalidTransition, RunState, RunStateMachine

S = RunState


def test_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(RunState)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # Edges QEMU 10 added that 7.2 does not have.
        (S.PRELAUNCH, S.SUSPENDED),
        (S.PAUSED, S.SUSPENDED),
        (S.FINISH_MIGRATE, S.SHUTDOWN),
        (S.SUSPENDED, S.PAUSED),
        (S.SAVE_VM, S.SUSPENDED),
        # Never allowed.
        (S.POSTMIGRATE, S.PAUSED),
        (S.INMIGRATE, S.DEBUG),
    ],
)
def test_refused_transitions(old: RunState, new: RunState) -> None:
    machine = RunStateMachine(old)
    with pytest.raises(InvalidTransition, match=f"'{old.value}' -> '{new.value}'"):
        machine.set(new)
    assert machine.state == old


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (S.PRELAUNCH, S.RUNNING),
        (S.PRELAUNCH, S.INMIGRATE),
        (S.INMIGRATE, S.PAUSED),
        (S.INMIGRATE, S.RUNNING),
        (S.RUNNING, S.PAUSED),
        (S.RUNNING, S.FINISH_MIGRATE),
        (S.FINISH_MIGRATE, S.POSTMIGRATE),
        (S.POSTMIGRATE, S.RUNNING),
        (S.PAUSED, S.PAUSED),
    ],
)
def test_allowed_transitions(old: RunState, new: RunState) -> None:
    machine = RunStateMachine(old)
    machine.set(new)
    assert machine.state == new


def test_keyval() -> None:
    assert parse_keyval("socket,id=a,path=/x,,y", implied_key="backend") == {
        "backend": "socket", "id": "a", "path": "/x,y"}
    assert parse_keyval("addr.type=unix,addr.path=/s") == {"addr": {"type": "unix", "path": "/s"}}
    assert parse_option('{"chardev": "m"}') == {"chardev": "m"}
    with pytest.raises(ConfigError):
        parse_keyval("a=1,a=2")
    with pytest.raises(ConfigError):
        parse_keyval("novalue")


def test_options_in_order() -> None:
    cfg = parse_args([
        "--chardev", "socket,id=m0,path=/tmp/a.sock,server=on,wait=off",
        "--qmp", "tcp::4444",
        "--monitor", "chardev=m0,mode=control,pretty=on",
        "--http", "9000",
        "-S", "--name", "vm1",
    ])
    monitors = [(m.id, m.address, m.pretty, m.client, m.wait) for m in cfg.monitors]
    assert monitors == [
        ("qmp0", InetAddress("127.0.0.1", "4444"), False, False, False),
        ("m0", UnixAddress("/tmp/a.sock"), True, False, False),
    ]
    assert cfg.actions[2] == HttpConfig("127.0.0.1", 9000)
    assert cfg.paused and cfg.name == "vm1" and not cfg.used_defaults


def test_defaults_when_no_listener_given() -> None:
    cfg = parse_args([])
    assert cfg.used_defaults
    assert [type(a) for a in cfg.actions] == [MonitorConfig, HttpConfig]
    assert cfg.version_info()["qemu"] == {"major": 7, "minor": 2, "micro": 0}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--monitor", "chardev=nope"], 'chardev "nope" not found'),
        (["--chardev", "socket,id=a,path=/x,server=on,wait=maybe"], "'wait' expects"),
        (["--chardev", "file,id=a,path=/x"], "'file' character devices are not supported"),
        (["--qmp", "stdio"], "unix:PATH or tcp:HOST:PORT"),
        (["--qmp-version", "7.2"], "MAJOR.MINOR.MICRO"),
        (["--chardev", "socket,id=a,path=/x,server=on,wait=off", "--chardev",
          "socket,id=a,path=/y,server=on,wait=off"], "duplicate chardev id 'a'"),
        (["--monitor", "chardev=a", "--chardev", "socket,id=a,path=/x,server=on,wait=off"],
         'chardev "a" not found'),
    ],
)
def test_bad_options(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)
