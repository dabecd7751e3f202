"""x509 certificates for TLS tests, made with ``openssl`` (nothing is checked in).

:func:`make_pki` builds, in one directory:

- ``ca/``: the trusted CA (``ca-cert.pem``, ``ca-key.pem``);
- ``rogue-ca/``: a second CA nobody trusts;
- ``server/``: QEMU's server layout (``ca-cert.pem``, ``server-cert.pem``,
  ``server-key.pem``) for ``localhost``/127.0.0.1/::1;
- ``client/``: QEMU's client layout (``ca-cert.pem``, ``client-cert.pem``,
  ``client-key.pem``), DN ``C=GB,O=Example,CN=client``;
- ``client-wrongdn/``: a good client cert with DN ``C=GB,O=Example,CN=intruder``;
- ``client-rogue/``: a client cert signed by the rogue CA (trusting the real CA);
- ``client-expired/``: a client cert of the real CA that expired in 2001;
- ``server-expired/``: the same for a server;
- ``server-rogue/``: a server cert signed by the rogue CA (trusting the real CA);
- ``server-encrypted/``: the server cert with its key encrypted by
  :data:`KEY_PASSWORD`;
- ``client-future/``, ``server-future/``: certificates of the real CA valid
  only from 2090 (not yet active);
- ``client-forged/``, ``server-forged/``: certificates whose issuer is the real
  CA's name, signed by another key of that name (``forged-ca/``): only their
  signature tells them apart.

Every directory is usable as ``tls-creds-x509,dir=...``.  The PKI is made
once per test session (``pki`` fixture in tests/conftest.py).
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

KEY_PASSWORD = "open-sesame-not-a-leak"
CLIENT_DN = "C=GB,O=Example,CN=client"
WRONG_DN = "C=GB,O=Example,CN=intruder"

_SERVER_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
"""
_CLIENT_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""
_CA_EXT = """\
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""


@dataclass(frozen=True)
class Pki:
    """Where each credentials directory is."""

    root: Path

    def dir(self, name: str) -> Path:
        return self.root / name

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca-cert.pem"

    def client_context(self, directory: str | None) -> ssl.SSLContext:
        """A client context trusting the real CA, presenting ``directory``'s
        client certificate (none: ``None``)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(self.ca_cert))
        if directory is not None:
            d = self.dir(directory)
            ctx.load_cert_chain(str(d / "client-cert.pem"), str(d / "client-key.pem"))
        return ctx


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _key(path: Path, password: str | None = None) -> None:
    args: list[str | Path] = ["genpkey", "-algorithm", "EC", "-pkeyopt",
                              "ec_paramgen_curve:P-256", "-out", path]
    if password is not None:
        args += ["-aes-256-cbc", "-pass", f"pass:{password}"]
    _openssl(*args, cwd=path.parent)


def _ca(directory: Path, name: str) -> None:
    directory.mkdir(parents=True)
    (directory / "ext.cnf").write_text(_CA_EXT)
    _key(directory / "ca-key.pem")
    _openssl("req", "-new", "-x509", "-key", "ca-key.pem", "-out", "ca-cert.pem",
             "-days", "3650", "-subj", f"/C=GB/O=Example/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)


#: The validity of the expired and of the not yet active certificates.
EXPIRED = ("20000101000000Z", "20010101000000Z")
FUTURE = ("20900101000000Z", "20910101000000Z")


def _issue(ca: Path, out: Path, subject: str, ext: str, *, days: int = 3650,
           dates: tuple[str, str] | None = None) -> None:
    """Sign ``out``'s key with ``ca``; ``dates`` (start, end) are set with ``openssl ca``."""
    csr = out.with_suffix(".csr")
    key = out.with_name(out.name.replace("-cert", "-key"))
    _openssl("req", "-new", "-key", key, "-out", csr, "-subj", subject, cwd=ca)
    extfile = out.with_suffix(".ext")
    extfile.write_text(ext)
    if dates is None:
        _openssl("x509", "-req", "-in", csr, "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
                 "-CAcreateserial", "-out", out, "-days", str(days), "-extfile", extfile,
                 cwd=ca)
    else:
        db = ca / "db"
        db.mkdir(exist_ok=True)
        (db / "index.txt").write_text("")
        (db / "serial").write_text("1000\n")
        conf = ca / "ca.cnf"
        conf.write_text(
            "[ca]\ndefault_ca = d\n[d]\n"
            f"dir = {db}\ndatabase = {db}/index.txt\nserial = {db}/serial\n"
            f"new_certs_dir = {db}\ncertificate = {ca}/ca-cert.pem\n"
            f"private_key = {ca}/ca-key.pem\ndefault_md = sha256\n"
            "policy = p\nunique_subject = no\ncopy_extensions = none\n"
            "[p]\ncountryName = optional\norganizationName = optional\n"
            "commonName = supplied\n"
        )
        _openssl("ca", "-batch", "-config", conf, "-in", csr, "-out", out,
                 "-startdate", dates[0], "-enddate", dates[1],
                 "-extfile", extfile, "-notext", cwd=ca)
    csr.unlink()
    extfile.unlink()


def _leaf(root: Path, name: str, ca: str, role: str, subject: str, *,
          dates: tuple[str, str] | None = None, password: str | None = None) -> None:
    d = root / name
    d.mkdir()
    shutil.copy(root / "ca" / "ca-cert.pem", d / "ca-cert.pem")
    _key(d / f"{role}-key.pem", password)
    if password is not None:
        # openssl req needs the key: sign a plain copy, then keep only the encrypted one.
        plain = d / f"{role}-plainkey.pem"
        _openssl("pkey", "-in", d / f"{role}-key.pem", "-passin", f"pass:{password}",
                 "-out", plain, cwd=d)
        tmp = d / "plain"
        tmp.mkdir()
        shutil.copy(plain, tmp / f"{role}-key.pem")
        _issue(root / ca, tmp / f"{role}-cert.pem", subject,
               _SERVER_EXT if role == "server" else _CLIENT_EXT, dates=dates)
        shutil.move(tmp / f"{role}-cert.pem", d / f"{role}-cert.pem")
        shutil.rmtree(tmp)
        plain.unlink()
        return
    _issue(root / ca, d / f"{role}-cert.pem", subject,
           _SERVER_EXT if role == "server" else _CLIENT_EXT, dates=dates)


def make_pki(root: Path) -> Pki:
    """Every credentials directory described in the module docstring, under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    _ca(root / "ca", "Test CA")
    _ca(root / "rogue-ca", "Rogue CA")
    server = "/C=GB/O=Example/CN=localhost"
    client = "/C=GB/O=Example/CN=client"
    _leaf(root, "server", "ca", "server", server)
    _leaf(root, "client", "ca", "client", client)
    _leaf(root, "client-wrongdn", "ca", "client", "/C=GB/O=Example/CN=intruder")
    _leaf(root, "client-rogue", "rogue-ca", "client", client)
    _leaf(root, "client-expired", "ca", "client", client, dates=EXPIRED)
    _leaf(root, "server-expired", "ca", "server", server, dates=EXPIRED)
    _leaf(root, "client-future", "ca", "client", client, dates=FUTURE)
    _leaf(root, "server-future", "ca", "server", server, dates=FUTURE)
    _ca(root / "forged-ca", "Test CA")  # the real CA's name, another key
    _leaf(root, "client-forged", "forged-ca", "client", client)
    _leaf(root, "server-forged", "forged-ca", "server", server)
    _leaf(root, "server-rogue", "rogue-ca", "server", server)
    _leaf(root, "server-encrypted", "ca", "server", server, password=KEY_PASSWORD)
    return Pki(root)
