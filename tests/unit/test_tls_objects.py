"""TLS credentials and authz objects on real certificates (made by tests/support/certs.py).

The error texts are qemu-storage-daemon 7.2's for the same directories
(tests/integration/test_tls_qsd.py compares them live).
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import pytest

from qmpd.cli import parse_args
from qmpd.errors import ConfigError, GenericError, QMPError
from qmpd.objects import ObjectRegistry
from qmpd.objects.authz import AuthzList, check_peer, format_dn
from qmpd.objects.tls import TlsCredsX509
from tests.support.certs import CLIENT_DN, KEY_PASSWORD, WRONG_DN, Pki

# --- distinguished names ------------------------------------------------------------------


def _subject(*rdns: tuple[tuple[str, str], ...]) -> tuple[tuple[tuple[str, str], ...], ...]:
    return tuple(rdns)


@pytest.mark.parametrize("subject, dn", [
    (_subject((("countryName", "GB"),), (("organizationName", "Example"),),
              (("commonName", "client"),)), "C=GB,O=Example,CN=client"),
    # Certificate order is kept, whatever it is.
    (_subject((("commonName", "client"),), (("countryName", "GB"),)), "CN=client,C=GB"),
    (_subject((("organizationalUnitName", "a"), ("commonName", "b")),), "OU=a+CN=b"),
    (_subject((("localityName", "x"),), (("stateOrProvinceName", "y"),),
              (("emailAddress", "e@x"),), (("domainComponent", "org"),)),
     "L=x,ST=y,EMAIL=e@x,DC=org"),
    (_subject((("organizationName", "Acme, Inc."),),), "O=Acme\\, Inc."),
    (_subject((("commonName", "a+b=c"),),), "CN=a\\+b=c"),
    (_subject((("commonName", " lead"),),), "CN=\\ lead"),
    (_subject((("commonName", "#hash"),),), "CN=\\#hash"),
    (_subject((("1.2.3.4", "v"),),), "1.2.3.4=v"),
    (_subject(), ""),
])
def test_format_dn_as_gnutls(subject: Any, dn: str) -> None:
    assert format_dn(subject) == dn


def test_format_dn_of_real_certificates(pki: Pki) -> None:
    decode = ssl._ssl._test_decode_cert  # type: ignore[attr-defined]
    for directory, dn in (("client", CLIENT_DN), ("client-wrongdn", WRONG_DN),
                          ("client-expired", CLIENT_DN)):
        cert = decode(str(pki.dir(directory) / "client-cert.pem"))
        assert format_dn(cert["subject"]) == dn


# --- authz ----------------------------------------------------------------------------------


def _add(reg: ObjectRegistry, **options: Any) -> None:
    reg.add_object(options)


def test_authz_simple_exact_only() -> None:
    reg = ObjectRegistry()
    _add(reg, **{"qom-type": "authz-simple", "id": "a", "identity": CLIENT_DN})
    authz = reg.authz("a")
    assert authz.is_allowed(CLIENT_DN)
    assert not authz.is_allowed(CLIENT_DN + " ")
    assert not authz.is_allowed("C=GB, O=Example, CN=client")
    cert = {"subject": ((("countryName", "GB"),), (("organizationName", "Example"),),
                        (("commonName", "client"),))}
    assert check_peer(authz, cert) is None
    refused = {"subject": ((("commonName", "intruder"),),)}
    assert check_peer(authz, refused) == "TLS x509 authz check for CN=intruder is denied"
    assert check_peer(authz, None) is not None


def test_authz_list_first_match_wins() -> None:
    reg = ObjectRegistry()
    _add(reg, **{"qom-type": "authz-list", "id": "l", "policy": "deny", "rules": [
        {"match": "C=GB,O=Example,CN=intruder", "policy": "deny"},
        {"match": "C=GB,O=Example,CN=*", "policy": "allow", "format": "glob"},
        {"match": "CN=?ob", "policy": "allow", "format": "glob"},
        {"match": "CN=[x]", "policy": "allow", "format": "glob"},
    ]})
    authz = reg.authz("l")
    assert authz.is_allowed(CLIENT_DN)
    assert not authz.is_allowed(WRONG_DN)
    assert authz.is_allowed("CN=bob") and not authz.is_allowed("CN=bbob")
    assert authz.is_allowed("CN=[x]") and not authz.is_allowed("CN=x")  # [ is literal
    assert not authz.is_allowed("C=FR,O=Example,CN=client")  # default policy
    assert isinstance(authz, AuthzList)
    assert authz.qom_get("rules")[1] == {"format": "glob", "policy": "allow",
                                          "match": "C=GB,O=Example,CN=*"}
    _add(reg, **{"qom-type": "authz-list", "id": "open", "policy": "allow"})
    assert reg.authz("open").is_allowed("anything")


def test_authz_list_file(tmp_path: Path) -> None:
    path = tmp_path / "acl.json"
    path.write_text(json.dumps({"policy": "deny", "rules": [
        {"match": CLIENT_DN, "policy": "allow"}]}))
    reg = ObjectRegistry()
    # The keyval form, as --object gives it.
    _add(reg, **{"qom-type": "authz-list-file", "id": "f", "filename": str(path),
                 "refresh": "off"})
    assert reg.authz("f").is_allowed(CLIENT_DN)
    assert not reg.authz("f").is_allowed(WRONG_DN)
    with pytest.raises(GenericError, match="refresh=off"):
        _add(reg, **{"qom-type": "authz-listfile", "id": "g", "filename": str(path),
                     "refresh": True})
    path.write_text("[1]")
    with pytest.raises(GenericError, match="File must contain a JSON object"):
        _add(reg, **{"qom-type": "authz-list-file", "id": "g", "filename": str(path)})


@pytest.mark.parametrize("options, text", [
    ({"qom-type": "authz-simple", "id": "z"}, "Parameter 'identity' is missing"),
    ({"qom-type": "authz-list", "id": "z", "policy": "maybe"},
     "Parameter 'policy' does not accept value 'maybe'"),
    ({"qom-type": "authz-list", "id": "z", "rules": [{"policy": "deny"}]},
     "Parameter 'rules[0].match' is missing"),
    ({"qom-type": "authz-list", "id": "z", "rules": [{"match": "x"}]},
     "Parameter 'rules[0].policy' is missing"),
    ({"qom-type": "authz-list", "id": "z", "rules": [{"match": "x", "policy": "allow",
                                                      "bogus": 1}]},
     "Parameter 'rules[0].bogus' is unexpected"),
    ({"qom-type": "authz-list", "id": "z", "rules": [3]},
     "Invalid parameter type for 'rules[0]', expected: object"),
    ({"qom-type": "authz-list-file", "id": "z"}, "Parameter 'filename' is missing"),
    ({"qom-type": "tls-creds-x509", "id": "t"}, "Missing 'dir' property value"),
    ({"qom-type": "tls-creds-x509", "id": "t", "dir": "/nonexist"},
     "Unable to access credentials /nonexist/ca-cert.pem: No such file or directory"),
    ({"qom-type": "tls-creds-x509", "id": "t", "dir": "/", "endpoint": "bogus"},
     "Parameter 'endpoint' does not accept value 'bogus'"),
    ({"qom-type": "tls-creds-x509", "id": "t", "dir": "/", "loaded": "on"},
     "Property 'tls-creds-x509.loaded' is not writable"),
])
def test_object_errors_as_qemu(options: dict[str, Any], text: str) -> None:
    with pytest.raises(GenericError) as info:
        ObjectRegistry().add_object(options)
    assert info.value.desc == text


def test_psk_refused_clearly() -> None:
    with pytest.raises(GenericError, match="no TLS-PSK"):
        ObjectRegistry().add_object({"qom-type": "tls-creds-psk", "id": "p", "dir": "/"})


# --- tls-creds-x509 -------------------------------------------------------------------------


def _creds(pki: Pki, directory: str, endpoint: str = "server", **extra: Any) -> str | None:
    """Create tls-creds-x509 on ``directory``: None, or QEMU's error text."""
    reg = ObjectRegistry()
    reg.add_object({"qom-type": "secret", "id": "pw", "data": KEY_PASSWORD})
    reg.add_object({"qom-type": "secret", "id": "bad", "data": "wrong"})
    try:
        reg.add_object({"qom-type": "tls-creds-x509", "id": "t",
                        "dir": str(pki.dir(directory)), "endpoint": endpoint, **extra})
    except QMPError as exc:
        return exc.desc
    return None


def test_x509_load_and_sanity_check(pki: Pki) -> None:
    d = pki.dir
    assert _creds(pki, "server") is None
    assert _creds(pki, "client", "client") is None
    assert _creds(pki, "server", "client") is None  # no client cert: only the CA
    assert _creds(pki, "server-expired") == (
        f"The server certificate {d('server-expired')}/server-cert.pem has expired")
    assert _creds(pki, "client-expired", "client") == (
        f"The client certificate {d('client-expired')}/client-cert.pem has expired")
    unknown = "failed validation against {0}/ca-cert.pem: The certificate hasn't got a known issuer"
    assert _creds(pki, "server-rogue") == (
        f"Our own certificate {d('server-rogue')}/server-cert.pem "
        + unknown.format(d("server-rogue")))
    assert _creds(pki, "client-rogue", "client") == (
        f"Our own certificate {d('client-rogue')}/client-cert.pem "
        + unknown.format(d("client-rogue")))
    for end in ("server", "client"):
        assert _creds(pki, f"{end}-future", end) == (
            f"The {end} certificate {d(end + '-future')}/{end}-cert.pem is not yet active")
        # The issuer's name is the CA's: only the signature gives the forgery away.
        assert _creds(pki, f"{end}-forged", end) == (
            f"Our own certificate {d(end + '-forged')}/{end}-cert.pem "
            + unknown.format(d(end + "-forged")))
        assert _creds(pki, f"{end}-forged", end, **{"sanity-check": False}) is None
    # sanity-check=off loads what it is given, as QEMU.
    assert _creds(pki, "server-expired", **{"sanity-check": False}) is None
    assert _creds(pki, "client", "server") == (
        f"Unable to access credentials {d('client')}/server-cert.pem: No such file or directory")


def test_x509_encrypted_key(pki: Pki) -> None:
    enc = pki.dir("server-encrypted")
    failed = (f"Cannot load certificate '{enc}/server-cert.pem' & key "
              f"'{enc}/server-key.pem': Decryption has failed.")
    assert _creds(pki, "server-encrypted") == failed
    assert _creds(pki, "server-encrypted", passwordid="bad") == failed
    assert _creds(pki, "server-encrypted", passwordid="nosuch") == "No secret with id 'nosuch'"
    assert _creds(pki, "server-encrypted", passwordid="pw") is None


def test_contexts_for_each_end(pki: Pki) -> None:
    reg = ObjectRegistry()
    reg.add_object({"qom-type": "tls-creds-x509", "id": "s", "dir": str(pki.dir("server")),
                    "endpoint": "server"})
    reg.add_object({"qom-type": "tls-creds-x509", "id": "c", "dir": str(pki.dir("client")),
                    "endpoint": "client", "verify-peer": "off"})
    server = reg.tls_creds("s", "server")
    assert server.server_context().verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(GenericError, match="Expected TLS credentials for a client endpoint"):
        server.client_context("localhost")
    client = reg.tls_creds("c", "client")
    assert client.client_context("localhost").verify_mode == ssl.CERT_NONE
    with pytest.raises(GenericError, match="Expected TLS credentials for a server endpoint"):
        reg.tls_creds("c", "server")
    with pytest.raises(GenericError, match="No TLS credentials with id 'x'"):
        reg.tls_creds("x")
    reg.add_object({"qom-type": "secret", "id": "pw", "data": "x"})
    with pytest.raises(GenericError, match="Object with id 'pw' is not TLS credentials"):
        reg.tls_creds("pw")
    assert isinstance(server, TlsCredsX509) and "secret" not in repr(server)


def test_object_del_refuses_creds_and_authz_in_use(pki: Pki) -> None:
    reg = ObjectRegistry()
    reg.add_object({"qom-type": "tls-creds-x509", "id": "s", "dir": str(pki.dir("server")),
                    "endpoint": "server"})
    reg.add_object({"qom-type": "authz-simple", "id": "a", "identity": CLIENT_DN})
    creds, authz = reg.tls_creds("s"), reg.authz("a")
    reg.hold(creds, "monitor m")
    reg.hold(authz, "monitor m")
    for oid in ("s", "a"):
        with pytest.raises(GenericError) as info:
            reg.delete(oid)
        assert info.value.desc == f"object '{oid}' is in use, can not be deleted"
    reg.release(creds, "monitor m")
    reg.release(authz, "monitor m")
    reg.delete("s")
    reg.delete("a")


# --- QOM ------------------------------------------------------------------------------------


def test_qom_tree(pki: Pki) -> None:
    reg = ObjectRegistry()
    with pytest.raises(QMPError, match="Device '/objects' not found"):
        reg.qom_list("/objects")  # QEMU creates the container with the first object
    reg.add_object({"qom-type": "secret", "id": "pw", "data": KEY_PASSWORD})
    reg.add_object({"qom-type": "tls-creds-x509", "id": "t", "dir": str(pki.dir("server")),
                    "endpoint": "server", "passwordid": "pw"})
    listing = reg.qom_list("/objects")
    assert listing == [{"name": "type", "type": "string"},
                       {"name": "pw", "type": "child<secret>"},
                       {"name": "t", "type": "child<tls-creds-x509>"}]
    assert reg.qom_list("objects") == listing == reg.qom_list("/objects/")
    assert reg.qom_get("/objects/t", "passwordid") == "pw"
    assert reg.qom_get("t", "endpoint") == "server"
    assert reg.qom_get("/objects", "type") == "container"
    with pytest.raises(QMPError, match=r"Property 'tls-creds-x509\.nosuch' not found"):
        reg.qom_get("/objects/t", "nosuch")
    with pytest.raises(QMPError, match="Path '' is ambiguous"):
        reg.qom_list("")
    with pytest.raises(GenericError, match="never shows"):
        reg.qom_get("/objects/pw", "data")
    names = {t["name"] for t in reg.qom_list_types("tls-creds", True)}
    assert names == {"tls-creds", "tls-creds-x509"}
    assert reg.qom_list_types("nosuch", False) == []


# --- the command line ----------------------------------------------------------------------


def test_cli_tls_options() -> None:
    cfg = parse_args(["--chardev", "socket,id=c,host=127.0.0.1,port=0,server=on,wait=off,"
                      "tls-creds=t,tls-authz=a", "--monitor", "c",
                      "--qmp", "tcp:127.0.0.1:0,tls-creds=t",
                      "--tls-handshake-timeout", "2.5"])
    first, second = cfg.monitors
    assert (first.tls_creds, first.tls_authz) == ("t", "a")
    assert (second.tls_creds, second.tls_authz, second.client) == ("t", None, False)
    assert cfg.tls_handshake_timeout == 2.5
    with pytest.raises(ConfigError, match="'tls_creds' option is incompatible with 'unix'"):
        parse_args(["--chardev", "socket,id=c,path=x,server=on,tls-creds=t"])
    with pytest.raises(ConfigError, match="'tls_creds' option is incompatible with 'unix'"):
        parse_args(["--qmp", "unix:x,tls-creds=t"])
