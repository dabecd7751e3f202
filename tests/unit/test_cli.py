"""The command line parsed as qemu-storage-daemon 7.2 parses it."""

from __future__ import annotations

import pytest

from qmpd.cli import BlockdevConfig, Exit, ObjectConfig, parse_args, scan
from qmpd.errors import ConfigError
from qmpd.nbd.config import ExportConfig
from qmpd.net import StdioAddress, UnixAddress


@pytest.mark.parametrize(("argv", "message"), [
    (["--pid", "x"], "unrecognized option '--pid'"),
    (["--daemon"], "unrecognized option '--daemon'"),
    (["--block", "x"], "unrecognized option '--block'"),
    (["--bogus"], "unrecognized option '--bogus'"),
    (["-x"], "invalid option -- 'x'"),
    (["--blockdev"], "option '--blockdev' requires an argument"),
    (["-mon"], "option '-mon' requires an argument"),
    (["-m"], "option requires an argument -- 'm'"),
    (["--daemonize=yes"], "option '--daemonize' doesn't allow an argument"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_errors_are_one_line_and_abbreviations_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    assert str(info.value) == message


def test_mon_is_monitor_never_m_on() -> None:
    cfg = parse_args(["--chardev", "socket,id=c,path=/tmp/x.sock,server=on,wait=off",
                      "-mon", "chardev=c", "-m", "512"])
    assert [(m.id, m.address) for m in cfg.monitors] == [("c", UnixAddress("/tmp/x.sock"))]
    assert scan(["-mon", "c", "-m", "on"]) == [("monitor", "c"), ("memory", "on")]


def test_long_options_in_every_spelling() -> None:
    want = [("pidfile", "p"), ("blockdev", "null-co,node-name=n")]
    assert scan(["--pidfile", "p", "--blockdev", "null-co,node-name=n"]) == want
    assert scan(["--pidfile=p", "--blockdev=null-co,node-name=n"]) == want
    assert scan(["-pidfile", "p", "-blockdev", "null-co,node-name=n"]) == want


def test_implied_keys() -> None:
    cfg = parse_args([
        "--object", "throttle-group,id=t,x-bps-total=1000",
        "--blockdev", "qcow2,node-name=x,file.driver=file,file.filename=/d.qcow2",
        "--export", "nbd,id=e,node-name=x",
        "--chardev", "socket,id=c,path=/q.sock,server=on,wait=off",
        "--monitor", "c",
    ])
    obj, blockdev, export, monitor = cfg.actions
    assert isinstance(obj, ObjectConfig) and obj.options["qom-type"] == "throttle-group"
    assert isinstance(blockdev, BlockdevConfig)
    assert blockdev.options == {"driver": "qcow2", "node-name": "x",
                                "file": {"driver": "file", "filename": "/d.qcow2"}}
    assert isinstance(export, ExportConfig) and export.options["type"] == "nbd"
    assert monitor == cfg.monitors[0] and monitor.id == "c"


@pytest.mark.parametrize(("chardev", "client", "wait"), [
    ("socket,id=c,path=/q.sock", True, False),
    ("socket,id=c,path=/q.sock,server=on", False, True),
    ("socket,id=c,path=/q.sock,server=on,wait=off", False, False),
    ("socket,id=c,host=127.0.0.1,port=4444,server=on,wait=on", False, True),
])
def test_chardev_modes_as_qemu(chardev: str, client: bool, wait: bool) -> None:
    (monitor,) = parse_args(["--chardev", chardev, "--monitor", "chardev=c"]).monitors
    assert (monitor.client, monitor.wait) == (client, wait)
    assert monitor.origin == f"--chardev {chardev}"


def test_stdio_monitor() -> None:
    (monitor,) = parse_args(["--chardev", "stdio,id=s", "--monitor", "s"]).monitors
    assert monitor.address == StdioAddress()


@pytest.mark.parametrize(("qmp", "client", "wait"), [
    ("unix:/q.sock", False, False),  # qmpd's own default: listen, do not wait
    ("unix:/q.sock,server=on,wait=off", False, False),
    ("unix:/q.sock,server,nowait", False, False),
    ("unix:/q.sock,server=on", False, True),
    ("unix:/q.sock,server=off", True, False),
])
def test_qmp_flags_as_qemu(qmp: str, client: bool, wait: bool) -> None:
    (monitor,) = parse_args(["--qmp", qmp]).monitors
    assert (monitor.client, monitor.wait) == (client, wait)


def test_defaults_only_without_any_argument() -> None:
    assert parse_args([]).used_defaults
    for argv in (["--blockdev", "null-co,node-name=n"], ["--log-level", "info"],
                 ["--nbd-server", "addr.type=unix,addr.path=/n.sock"]):
        cfg = parse_args(argv)
        assert not cfg.used_defaults and not cfg.monitors and not cfg.http


def test_monitor_names_do_not_depend_on_defaults() -> None:
    assert [m.id for m in parse_args([]).monitors] == ["qmp0"]
    cfg = parse_args(["--qmp", "unix:/a.sock", "--qmp", "unix:/b.sock"])
    assert [m.id for m in cfg.monitors] == ["qmp0", "qmp1"]


def test_quiet_by_default() -> None:
    assert parse_args(["--blockdev", "null-co,node-name=n"]).log_level == "warning"
    assert parse_args(["-D", "/log", "--log-level", "info"]).log_file == "/log"


@pytest.mark.parametrize("argv", [["-V"], ["--version"], ["-h"], ["--help"]])
def test_version_and_help_exit(argv: list[str]) -> None:
    with pytest.raises(Exit) as info:
        parse_args(argv)
    assert "qmpd" in info.value.text


def test_http_options() -> None:
    """--http keeps [HOST:]PORT and takes TLS options; plain HTTP defaults to loopback."""
    from qmpd.cli import HttpConfig

    assert parse_args([]).http == [HttpConfig("127.0.0.1", 9180)]
    assert parse_args(["--http", "9000"]).http == [HttpConfig("127.0.0.1", 9000)]
    assert parse_args(["--http", ":9000"]).http == [HttpConfig("127.0.0.1", 9000)]
    assert parse_args(["--http", "[::1]:9000"]).http == [HttpConfig("::1", 9000)]
    assert parse_args(["--http", "0.0.0.0:443,tls-creds=t,tls-authz=a"]).http == [
        HttpConfig("0.0.0.0", 443, "t", "a")]
    assert parse_args(["--http", "0.0.0.0:80,insecure=on"]).http == [
        HttpConfig("0.0.0.0", 80, insecure=True)]
    for value, message in (
        ("9000,tls-authz=a", "'tls-authz' requires 'tls-creds'"),
        ("9000,bogus=1", "Invalid parameter 'bogus'"),
        ("9000,insecure=maybe", "Parameter 'insecure' expects 'on' or 'off'"),
    ):
        with pytest.raises(ConfigError) as info:
            parse_args(["--http", value])
        assert str(info.value) == f"--http {value}: {message}"


@pytest.mark.parametrize(("value", "shown", "message"), [
    ("secret,id=s,data=TOPSECRET,bogus=1", "secret,id=s,data=<redacted>,bogus=1", None),
    ("secret,id=s,data=TOP,SECRET", "secret,id=s,data=<redacted>",
     "Expected '=' after parameter '<redacted>'"),
    ("secret,id=s,data=TOP,,SECRET,", "secret,id=s,data=<redacted>",
     "Invalid parameter '' in 'secret,id=s,data=<redacted>'"),
    ('{"qom-type": "secret", "id": "s", "data": "TOPSECRET", "x": 1}',
     '{"qom-type": "secret", "id": "s", "data": "<redacted>", "x": 1}', None),
])
def test_object_errors_never_show_secret_data(value: str, shown: str,
                                              message: str | None) -> None:
    """QSD prints an --object's text in its errors, a secret's data too; qmpd does not."""
    from qmpd.cli import redact, redact_message

    assert redact(value) == shown
    try:
        parse_args(["--object", value])
    except ConfigError as exc:
        assert str(exc) == f"--object {shown}: {message}"
        return
    assert message is None  # parsed: the error comes later, from object-add
    assert "SECRET" not in redact_message(value, f"bad {value}: TOPSECRET")
