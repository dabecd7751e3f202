"""TLS credentials: ``tls-creds-x509`` as Python ``ssl`` contexts; ``tls-creds-psk`` refused.

``tls-creds-x509`` reads QEMU's directory layout when created (as QEMU's
``complete``): ``ca-cert.pem`` always; ``server-cert.pem``, ``server-key.pem``
and optionally ``dh-params.pem`` and ``ca-crl.pem`` for ``endpoint=server``;
optionally ``client-cert.pem`` and ``client-key.pem`` for a client.  Users
(QMP monitors and HTTPS now; NBD and migration later) ask it for a context with
:meth:`TlsCredsX509.server_context` or :meth:`TlsCredsX509.client_context`
and register themselves in :attr:`TlsCredsX509.users`, which makes
``object-del`` refuse while they hold it.

The sanity check (``sanity-check``, on by default) uses the standard library
only: the CA certificates' dates and CA flag come from
``SSLContext.get_ca_certs``; our own certificate's dates and issuer from the
stdlib's PEM decoder (``ssl._ssl._test_decode_cert``, private but present in
every CPython 3); our own certificate, a server's or a client's, is also
verified against the CA by an in-memory TLS handshake (no socket), which
checks its signature.

``priority`` (a GnuTLS priority string) is accepted and shown by qom-get but
not applied: Python's ssl module speaks OpenSSL cipher lists, not GnuTLS's;
qmpd uses OpenSSL's defaults with TLS 1.2 as the minimum.
"""

from __future__ import annotations

import errno
import os
import ssl
import time
from typing import Any

from qmpd.errors import GenericError
from qmpd.objects.base import SecretLookup, UserObject, check_members, to_bool, to_str

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
DH_PARAMS = "dh-params.pem"

_TLS_PROPERTIES = ("verify-peer", "dir", "endpoint", "priority")
_TLS_QOM = (("endpoint", "QCryptoTLSCredsEndpoint"), ("dir", "string"),
            ("verify-peer", "bool"), ("priority", "string"))


def _endpoint(value: Any) -> str:
    endpoint = to_str(value, "endpoint")
    if endpoint not in ("client", "server"):
        raise GenericError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
    return endpoint


def _path(directory: str, name: str, required: bool) -> str | None:
    """QEMU's qcrypto_tls_creds_get_path: a required file must be readable."""
    path = os.path.join(directory, name)
    if os.access(path, os.R_OK):
        return path
    if required:
        code = errno.ENOENT if not os.path.exists(path) else errno.EACCES
        raise GenericError(f"Unable to access credentials {path}: {os.strerror(code)}")
    return None


def _key_error(exc: ssl.SSLError, key: str) -> str:
    """GnuTLS's words for why a certificate and key did not load."""
    if "mismatch" in f"{exc.reason or ''} {exc}".lower():
        return "The certificate and the given key do not match."
    try:
        with open(key, "rb") as f:
            encrypted = b"ENCRYPTED" in f.read(4096)
    except OSError:
        return "Error while reading file."
    # OpenSSL says only "PEM lib" for a wrong or missing password.
    return "Decryption has failed." if encrypted else "Base64 decoding error."


def _decode(path: str) -> dict[str, Any] | None:
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        info: dict[str, Any] = decode(path)
    except (ssl.SSLError, OSError, ValueError):
        return None
    return info


def _times(info: dict[str, Any], what: str, path: str) -> None:
    seconds = ssl.cert_time_to_seconds
    current = time.time()
    if "notAfter" in info and seconds(info["notAfter"]) < current:
        raise GenericError(f"The {what} certificate {path} has expired")
    if "notBefore" in info and seconds(info["notBefore"]) > current:
        raise GenericError(f"The {what} certificate {path} is not yet active")


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, *, verifier: str) -> None:
    """Run a TLS handshake between two contexts in memory (no socket).

    The ``verifier`` side's error ("client" or "server") is raised; the other
    side's complaints do not matter here.
    """
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c_done = s_done = False
    for _ in range(20):
        if not c_done:
            try:
                c.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                if verifier == "client":
                    raise
                c_done = True
        s_in.write(c_out.read())
        if not s_done:
            try:
                s.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                if verifier == "server":
                    raise
                s_done = True
        c_in.write(s_out.read())
        if c_done and s_done:
            return


class TlsCredsX509(UserObject):
    """x509 credentials: the contexts for either end of a TLS connection."""

    qom_type = "tls-creds-x509"
    qom_parent = "tls-creds"
    properties = (*_TLS_PROPERTIES, "sanity-check", "passwordid")
    qom_properties = (*_TLS_QOM, ("sanity-check", "bool"), ("passwordid", "string"),
                      ("loaded", "bool"))

    def __init__(self, object_id: str, props: dict[str, Any]) -> None:
        super().__init__(object_id)
        self.dir: str = props["dir"]
        self.endpoint: str = props["endpoint"]
        self.verify_peer: bool = props["verify-peer"]
        self.priority: str = props["priority"]
        self.sanity_check: bool = props["sanity-check"]
        self.passwordid: str = props["passwordid"]
        #: Who holds it ("monitor qmp0"...): object-del refuses while any do.
        self.users: set[str] = set()
        self._server: ssl.SSLContext | None = None
        self._client: dict[str | None, ssl.SSLContext] = {}
        self._ca = ""
        self._crl: str | None = None
        self._cert: str | None = None
        self._key: str | None = None
        self._dh: str | None = None
        self._password = b""

    def __repr__(self) -> str:
        return f"TlsCredsX509(id={self.id!r}, endpoint={self.endpoint!r})"

    @classmethod
    def parse(cls, props: dict[str, Any]) -> dict[str, Any]:
        out = {
            "verify-peer": to_bool(props.get("verify-peer", True), "verify-peer"),
            "dir": to_str(props["dir"], "dir") if "dir" in props else None,
            "endpoint": _endpoint(props.get("endpoint", "client")),
            "priority": to_str(props.get("priority", ""), "priority"),
            "sanity-check": to_bool(props.get("sanity-check", True), "sanity-check"),
            "passwordid": to_str(props.get("passwordid", ""), "passwordid"),
        }
        if "loaded" in props:
            raise GenericError(f"Property '{cls.qom_type}.loaded' is not writable")
        check_members(props, cls.properties)
        return out

    @classmethod
    def create(cls, object_id: str, props: dict[str, Any],
               secret: SecretLookup | None = None) -> TlsCredsX509:
        parsed = cls.parse(props)
        if parsed["dir"] is None:
            raise GenericError("Missing 'dir' property value")
        creds = cls(object_id, parsed)
        creds._load(secret)
        return creds

    # --- loading (QEMU's qcrypto_tls_creds_x509_load) ------------------------------

    def _load(self, secret: SecretLookup | None) -> None:
        server = self.endpoint == "server"
        self._ca = _path(self.dir, CA_CERT, True) or ""
        if server:
            self._crl = _path(self.dir, CA_CRL, False)
            self._cert = _path(self.dir, SERVER_CERT, True)
            self._key = _path(self.dir, SERVER_KEY, True)
            self._dh = _path(self.dir, DH_PARAMS, False)
        else:
            self._cert = _path(self.dir, CLIENT_CERT, False)
            self._key = _path(self.dir, CLIENT_KEY, False)
        if self.sanity_check:
            self._check_dates_and_issuer()
        if self.passwordid and self._cert is not None and self._key is not None:
            if secret is None:
                raise GenericError(f"No secret with id '{self.passwordid}'")
            self._password = secret(self.passwordid)
        # Building the contexts loads every file: errors surface now, not at first use.
        if server:
            self._server = self._make_server()
        else:
            self._client[None] = self._make_client(None)
        if self.sanity_check:
            self._check_chain()

    def _check_dates_and_issuer(self) -> None:
        server = self.endpoint == "server"
        what = "server" if server else "client"
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            probe.load_verify_locations(cafile=self._ca)
        except (ssl.SSLError, OSError):
            raise GenericError(f"Unable to import CA certificate list {self._ca}") from None
        cas = probe.get_ca_certs()
        issuer: Any = None
        if self._cert is not None:
            info = _decode(self._cert)
            if info is None:
                raise GenericError(f"Unable to import {what} certificate {self._cert}: "
                                   "Base64 decoding error.")
            _times(info, what, self._cert)
            issuer = info.get("issuer")
            own = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            own.load_verify_locations(cafile=self._cert)
            if own.get_ca_certs():
                raise GenericError(f"The certificate {self._cert} basic constraints show a "
                                   f"CA, but we need one for a {what}")
        for ca in cas:
            _times(ca, "CA", self._ca)
        with open(self._ca, "rb") as f:
            listed = f.read().count(b"-----BEGIN CERTIFICATE-----")
        if len(cas) < listed:
            raise GenericError(f"The certificate {self._ca} basic constraints do not show a CA")
        if issuer is not None and cas:
            if all(ca.get("subject") != issuer for ca in cas):
                self._bad_pair("The certificate hasn't got a known issuer")

    def _bad_pair(self, reason: str) -> None:
        raise GenericError(f"Our own certificate {self._cert} failed validation against "
                           f"{self._ca}: {reason}")

    def _check_chain(self) -> None:
        """Verify our own certificate's signature against the CA, in memory.

        A server's certificate is checked by a client that trusts the CA; a
        client's by a server that trusts the CA and asks for it (that server
        presents the client's own certificate: nobody checks it).
        """
        if self._cert is None or self._key is None:
            return
        own = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if self.endpoint == "server"
                             else ssl.PROTOCOL_TLS_CLIENT)
        own.load_cert_chain(self._cert, self._key, password=self._password)
        checker = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if self.endpoint == "server"
                                 else ssl.PROTOCOL_TLS_SERVER)
        checker.check_hostname = False
        checker.load_verify_locations(cafile=self._ca)
        checker.verify_mode = ssl.CERT_REQUIRED
        try:
            if self.endpoint == "server":
                _handshake(own, checker, verifier="client")
            else:
                own.check_hostname = False
                own.verify_mode = ssl.CERT_NONE
                checker.load_cert_chain(self._cert, self._key, password=self._password)
                _handshake(checker, own, verifier="server")
        except ssl.SSLCertVerificationError as exc:
            code = exc.verify_code
            if code in (9, 10):  # not yet valid, expired
                what = "is not yet active" if code == 9 else "has expired"
                raise GenericError(f"The {self.endpoint} certificate {self._cert} {what}"
                                   ) from None
            if code == 23:
                self._bad_pair("The certificate has been revoked")
            if code in (2, 20, 21):
                self._bad_pair("The certificate hasn't got a known issuer")
            self._bad_pair("The certificate is not trusted")
        except ssl.SSLError:
            pass  # not about our certificate: the contexts load, handshakes will tell

    def _base(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_verify_locations(cafile=self._ca)
        except (ssl.SSLError, OSError) as exc:
            raise GenericError(f"Cannot load CA certificate '{self._ca}': "
                               f"{getattr(exc, 'reason', None) or 'Error while reading file.'}"
                               ) from None
        if self._cert is not None and self._key is not None:
            try:
                ctx.load_cert_chain(self._cert, self._key, password=self._password)
            except ssl.SSLError as exc:
                raise GenericError(f"Cannot load certificate '{self._cert}' & key "
                                   f"'{self._key}': {_key_error(exc, self._key)}") from None
        if self._crl is not None:
            try:
                ctx.load_verify_locations(cafile=self._crl)
            except (ssl.SSLError, OSError):
                raise GenericError(f"Cannot load CRL '{self._crl}': Error in parsing.") from None
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        return ctx

    def _make_server(self) -> ssl.SSLContext:
        ctx = self._base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        if self._dh is not None:
            try:
                ctx.load_dh_params(self._dh)
            except (ssl.SSLError, OSError):
                raise GenericError(f"Cannot load DH parameters from {self._dh}") from None
        return ctx

    def _make_client(self, hostname: str | None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx = self._base(ctx)
        ctx.check_hostname = self.verify_peer and hostname is not None
        return ctx

    # --- for users ------------------------------------------------------------------

    def server_context(self) -> ssl.SSLContext:
        """The context a listening end wraps accepted sockets with."""
        if self._server is None:
            raise GenericError("Expected TLS credentials for a server endpoint")
        return self._server

    def client_context(self, hostname: str | None = None) -> ssl.SSLContext:
        """The context a connecting end uses; ``hostname`` is then checked (with verify-peer)."""
        if self.endpoint != "client":
            raise GenericError("Expected TLS credentials for a client endpoint")
        ctx = self._client.get(hostname)
        if ctx is None:
            ctx = self._client[hostname] = self._make_client(hostname)
        return ctx

    def in_use(self) -> bool:
        return bool(self.users)

    def qom_get(self, name: str) -> Any:
        values = {
            "endpoint": self.endpoint, "dir": self.dir, "verify-peer": self.verify_peer,
            "priority": self.priority, "sanity-check": self.sanity_check,
            "passwordid": self.passwordid, "loaded": True,
        }
        if name in values:
            return values[name]
        return super().qom_get(name)


class TlsCredsPsk(UserObject):
    """Refused: Python's ssl module (3.11) cannot do TLS-PSK."""

    qom_type = "tls-creds-psk"
    qom_parent = "tls-creds"
    properties = (*_TLS_PROPERTIES, "username")

    @classmethod
    def create(cls, object_id: str, props: dict[str, Any],
               secret: SecretLookup | None = None) -> TlsCredsPsk:
        to_bool(props.get("verify-peer", True), "verify-peer")
        for name in ("dir", "priority", "username"):
            if name in props:
                to_str(props[name], name)
        _endpoint(props.get("endpoint", "client"))
        check_members(props, cls.properties)
        raise GenericError("tls-creds-psk is not supported by qmpd: Python's ssl module "
                           "has no TLS-PSK; use tls-creds-x509")
