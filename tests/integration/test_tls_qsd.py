"""TLS credentials, authz objects and QOM queries side by side with qemu-storage-daemon 7.2.

The same conversation runs on both; replies must be equal, except that
listings are compared as sets (QEMU lists in hash-table order).  Where qmpd
differs on purpose (tls-creds-psk, secrets shown by qom-get, authz-list-file,
the full qom-list-types) it is tested elsewhere, not here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess
from tests.integration.test_objects import _qsd, _replay
from tests.support.certs import CLIENT_DN, KEY_PASSWORD, Pki


def _conversation(pki: Pki) -> list[tuple[str, dict[str, Any]]]:
    d = pki.dir
    x509 = {"qom-type": "tls-creds-x509"}
    return [
        ("qom-list", {"path": "/objects"}),
        ("object-add", {**x509, "id": "t0"}),
        ("object-add", {**x509, "id": "t0", "dir": "/nonexist"}),
        ("object-add", {**x509, "id": "t0", "dir": str(d("client"))}),
        ("object-add", {**x509, "id": "t0", "dir": str(d("client")), "endpoint": "client"}),
        ("object-add", {**x509, "id": "t1", "dir": str(d("server")), "endpoint": "server"}),
        ("object-add", {**x509, "id": "t2", "dir": str(d("server-expired")),
                        "endpoint": "server"}),
        ("object-add", {**x509, "id": "t2", "dir": str(d("server-rogue")),
                        "endpoint": "server"}),
        ("object-add", {**x509, "id": "t2", "dir": str(d("client-expired")),
                        "endpoint": "client"}),
        ("object-add", {**x509, "id": "t2", "dir": str(d("client-rogue")),
                        "endpoint": "client"}),
        # Not yet active, and signed by another key of the CA's name, either end:
        # the client's certificate is checked at load time as the server's is.
        *[("object-add", {**x509, "id": "t2", "dir": str(d(f"{end}-{kind}")), "endpoint": end})
          for end in ("server", "client") for kind in ("future", "forged")],
        ("object-add", {**x509, "id": "t5", "dir": str(d("client-forged")),
                        "endpoint": "client", "sanity-check": False}),
        ("object-add", {**x509, "id": "t2", "dir": str(d("client")), "endpoint": "server"}),
        ("object-add", {**x509, "id": "t2", "dir": str(d("server-expired")),
                        "endpoint": "server", "sanity-check": False}),
        ("object-add", {**x509, "id": "t3", "dir": str(d("server-encrypted")),
                        "endpoint": "server"}),
        ("object-add", {**x509, "id": "t3", "dir": str(d("server-encrypted")),
                        "endpoint": "server", "passwordid": "nosuch"}),
        ("object-add", {"qom-type": "secret", "id": "bad", "data": "wrong"}),
        ("object-add", {**x509, "id": "t3", "dir": str(d("server-encrypted")),
                        "endpoint": "server", "passwordid": "bad"}),
        ("object-add", {"qom-type": "secret", "id": "pw", "data": KEY_PASSWORD}),
        ("object-add", {**x509, "id": "t3", "dir": str(d("server-encrypted")),
                        "endpoint": "server", "passwordid": "pw"}),
        ("object-add", {**x509, "id": "t4", "dir": str(d("server")), "endpoint": "bogus"}),
        ("object-add", {**x509, "id": "t4", "dir": str(d("server")), "verify-peer": "yes"}),
        ("object-add", {**x509, "id": "t4", "dir": str(d("server")), "bogus": 1}),
        ("object-add", {**x509, "id": "t4", "dir": str(d("server")), "loaded": True}),
        ("object-add", {**x509, "id": "t4", "dir": str(d("server")), "priority": "NORMAL",
                        "verify-peer": False, "endpoint": "server"}),
        ("object-add", {"qom-type": "authz-simple", "id": "z0"}),
        ("object-add", {"qom-type": "authz-simple", "id": "z0", "identity": CLIENT_DN}),
        ("object-add", {"qom-type": "authz-list", "id": "z1"}),
        ("object-add", {"qom-type": "authz-list", "id": "z2", "policy": "maybe"}),
        ("object-add", {"qom-type": "authz-list", "id": "z2", "rules": [{"policy": "deny"}]}),
        ("object-add", {"qom-type": "authz-list", "id": "z2", "rules": [{"match": "x"}]}),
        ("object-add", {"qom-type": "authz-list", "id": "z2",
                        "rules": [{"match": "a", "policy": "allow", "format": "regex"}]}),
        ("object-add", {"qom-type": "authz-list", "id": "z2",
                        "rules": [{"match": "a", "policy": "allow", "bogus": 1}]}),
        ("object-add", {"qom-type": "authz-list", "id": "z2", "rules": "x"}),
        ("object-add", {"qom-type": "authz-list", "id": "z2", "policy": "allow", "rules": [
            {"match": "CN=*", "policy": "deny", "format": "glob"},
            {"match": "x", "policy": "allow"}]}),
        ("qom-list", {"path": "/objects"}),
        ("qom-list", {"path": "objects"}),
        ("qom-list", {"path": "/nosuch"}),
        ("qom-list", {"path": ""}),
        ("qom-list", {"path": "/objects/t1"}),
        ("qom-list", {"path": "t3"}),
        ("qom-list", {"path": "/objects/z0"}),
        ("qom-list", {"path": "/objects/z2"}),
        ("qom-list", {"path": "/objects/pw"}),
        *[("qom-get", {"path": "/objects/t1", "property": p}) for p in (
            "dir", "endpoint", "verify-peer", "priority", "loaded", "sanity-check",
            "passwordid", "type", "nosuch")],
        ("qom-get", {"path": "/objects/t3", "property": "passwordid"}),
        ("qom-get", {"path": "/objects/t4", "property": "verify-peer"}),
        ("qom-get", {"path": "/objects/nosuch", "property": "dir"}),
        ("qom-get", {"path": "/objects/z0", "property": "identity"}),
        ("qom-get", {"path": "/objects/z2", "property": "policy"}),
        ("qom-get", {"path": "/objects/z2", "property": "rules"}),
        ("qom-get", {"path": "/objects/z1", "property": "rules"}),
        ("qom-get", {"path": "/objects/pw", "property": "format"}),
        ("qom-get", {"path": "/objects", "property": "type"}),
        ("qom-list-types", {"implements": "authz", "abstract": True}),
        ("qom-list-types", {"implements": "nosuch"}),
        ("object-del", {"id": "t1"}),
        ("object-del", {"id": "z0"}),
        ("object-del", {"id": "t1"}),
    ]


def _canonical(reply: Any) -> Any:
    if isinstance(reply, list):
        return sorted(reply, key=repr)
    return reply


@pytest.mark.qemu("qemu-storage-daemon")
def test_tls_objects_and_qom_match_qsd(qmpd: QmpdProcess, pki: Pki, tmp_path: Path) -> None:
    conversation = _conversation(pki)
    client = qmpd.client()
    client.negotiate()
    ours = _replay(client, conversation)
    proc, qsd_client = _qsd()
    try:
        theirs = _replay(qsd_client, conversation)
    finally:
        proc.terminate()
        proc.wait(10)
    for (execute, args), mine, qemu in zip(conversation, ours, theirs, strict=True):
        assert _canonical(mine) == _canonical(qemu), (execute, args)
