"""The nbd driver's pure parts: QEMU 7.2's option-error texts and node filenames
(the values were read from qemu-storage-daemon 7.2; tests/interop/test_nbd_driver.py
compares live)."""

from __future__ import annotations

from typing import Any

import pytest

from qmpd import net
from qmpd.block.core import BlockLayer
from qmpd.block.filename import refresh_filename
from qmpd.block.graph import NodeConfig
from qmpd.block.nbd import NbdDriver
from qmpd.nbd import protocol as p
from qmpd.nbd.client import NbdOptionError


@pytest.mark.parametrize(("reply", "option", "text"), [
    (p.Rep.ERR_UNKNOWN, p.Opt.GO, "Requested export not available"),
    (p.Rep.ERR_POLICY, p.Opt.GO, "Denied by server for option 7 (go)"),
    (p.Rep.ERR_INVALID, p.Opt.SET_META_CONTEXT,
     "Invalid parameters for option 10 (set meta context)"),
    (p.Rep.ERR_PLATFORM, p.Opt.INFO, "Server lacks support for option 6 (info)"),
    (p.Rep.ERR_TLS_REQD, p.Opt.GO, "TLS negotiation required before option 7 (go)"),
    (p.Rep.ERR_SHUTDOWN, p.Opt.LIST, "Server shutting down before option 3 (list)"),
    (p.Rep.ERR_BLOCK_SIZE_REQD, p.Opt.GO, "Server requires INFO_BLOCK_SIZE for option 7 (go)"),
    (p.Rep.ERR_TOO_BIG, p.Opt.GO, "Unknown error code when asking for option 7 (go)"),
    (p.Rep.ERR_POLICY, p.Opt.EXTENDED_HEADERS,
     "Denied by server for option 11 (<unknown>)"),
])
def test_option_errors_read_as_qemu(reply: int, option: int, text: str) -> None:
    assert NbdOptionError(reply, "server's words", option).qemu_text() == text


def _node(layer: BlockLayer, options: dict[str, Any]) -> NbdDriver:
    node = layer.graph.new_node("n", False, NodeConfig(False, False, "off", False, False,
                                                       False, False))
    node.options = options
    driver = NbdDriver(node)
    node.driver = driver
    driver.server = options["server"]
    driver.address = net.parse_socket_address(options["server"])
    driver.export = options.get("export")
    return driver


UNIX = {"type": "unix", "path": "/run/s.sock"}
INET = {"type": "inet", "host": "127.0.0.1", "port": "10809"}


@pytest.mark.parametrize(("options", "filename"), [
    ({"server": UNIX, "export": "exp"}, "nbd+unix:///exp?socket=/run/s.sock"),
    ({"server": UNIX}, "nbd+unix://?socket=/run/s.sock"),
    ({"server": UNIX, "export": ""}, "nbd+unix:///?socket=/run/s.sock"),
    ({"server": INET, "export": "exp"}, "nbd://127.0.0.1:10809/exp"),
    ({"server": INET}, "nbd://127.0.0.1:10809"),
    ({"server": INET, "export": "exp", "tls-hostname": "h", "reconnect-delay": 5},
     "nbd://127.0.0.1:10809/exp"),
    # What a URI cannot say makes a json: filename of the strong options,
    # server.* flattened, in QDict order.
    ({"server": {**INET, "to": 10810}},
     'json:{"server.to": 10810, "server.port": "10809", "server.host": "127.0.0.1", '
     '"driver": "nbd", "server.type": "inet"}'),
    ({"server": {**INET, "ipv4": True}, "export": ""},
     'json:{"server.port": "10809", "server.host": "127.0.0.1", "driver": "nbd", '
     '"export": "", "server.type": "inet", "server.ipv4": true}'),
])
async def test_filenames_as_qemu(layer: BlockLayer, options: dict[str, Any],
                                 filename: str) -> None:
    driver = _node(layer, {"driver": "nbd", "node-name": "n", **options})
    assert refresh_filename(driver.node) == filename
