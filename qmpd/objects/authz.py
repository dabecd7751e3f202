"""Authorization objects: ``authz-simple``, ``authz-list`` and ``authz-list-file``.

Each answers :meth:`Authz.is_allowed` for an identity: for TLS, the peer
certificate's distinguished name as GnuTLS prints it (:func:`format_dn`).

``authz-list-file`` reads QEMU's JSON file (``{"policy": ..., "rules":
[...]}``) when created; ``refresh=on`` (reload when the file changes, by
inotify in QEMU) is refused: qmpd has no file watcher, and a list that
silently stops following its file would be worse than an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from qmpd.errors import GenericError
from qmpd.objects.base import SecretLookup, UserObject, check_members, to_str
from qmpd.objects.secret import read_secret_file

#: X.500 attribute names in DNs as GnuTLS prints them (the rest as OIDs).
_SHORT_NAMES = {
    "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
    "organizationName": "O", "organizationalUnitName": "OU", "commonName": "CN",
    "emailAddress": "EMAIL", "domainComponent": "DC", "userId": "UID",
    "streetAddress": "STREET", "serialNumber": "serialNumber", "title": "title",
    "surname": "SN", "givenName": "GN", "initials": "initials", "pseudonym": "pseudonym",
    "generationQualifier": "generationQualifier", "dnQualifier": "dnQualifier",
    "name": "name", "postalCode": "postalCode", "businessCategory": "businessCategory",
}

_ESCAPE = re.compile(r'([,+"\\<>;])')

Subject = Sequence[Sequence[tuple[str, str]]]


def _escape(value: str) -> str:
    """RFC 4514 escaping, as GnuTLS applies it to attribute values."""
    out = _ESCAPE.sub(r"\\\1", value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" ") and len(out) > 1:
        out = out[:-1] + "\\ "
    return out


def format_dn(subject: Subject) -> str:
    """A certificate subject (``SSLSocket.getpeercert()["subject"]``) as GnuTLS prints it.

    The RDNs in certificate order, ``,`` between them and ``+`` inside a
    multi-valued RDN, no spaces: ``C=GB,O=Example,CN=client``.
    """
    rdns = []
    for rdn in subject:
        rdns.append("+".join(f"{_SHORT_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(rdns)


@lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    """GLib's g_pattern_match_simple: ``*`` and ``?`` only, nothing else is special."""
    parts = ("." if ch == "?" else ".*" if ch == "*" else re.escape(ch) for ch in pattern)
    return re.compile("".join(parts), re.DOTALL)


class Authz(UserObject):
    """Something that says yes or no to an identity."""

    qom_parent = "authz"

    def __init__(self, object_id: str) -> None:
        super().__init__(object_id)
        self.users: set[str] = set()

    def is_allowed(self, identity: str) -> bool:
        raise NotImplementedError

    def in_use(self) -> bool:
        return bool(self.users)


class AuthzSimple(Authz):
    """Exactly one identity is allowed."""

    qom_type = "authz-simple"
    properties = ("identity",)
    qom_properties = (("identity", "string"),)

    def __init__(self, object_id: str, identity: str) -> None:
        super().__init__(object_id)
        self.identity = identity

    @classmethod
    def create(cls, object_id: str, props: dict[str, Any],
               secret: SecretLookup | None = None) -> AuthzSimple:
        if "identity" not in props:
            raise GenericError("Parameter 'identity' is missing")
        identity = to_str(props["identity"], "identity")
        check_members(props, cls.properties)
        return cls(object_id, identity)

    def is_allowed(self, identity: str) -> bool:
        return identity == self.identity

    def qom_get(self, name: str) -> Any:
        return self.identity if name == "identity" else super().qom_get(name)


@dataclass(frozen=True)
class Rule:
    """QAuthZListRule."""

    match: str
    policy: str
    glob: bool = False

    def matches(self, identity: str) -> bool:
        if self.glob:
            return _glob(self.match).fullmatch(identity) is not None
        return identity == self.match

    def to_qapi(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": "glob"} if self.glob else {}
        return out | {"policy": self.policy, "match": self.match}


def _policy(value: Any, name: str) -> str:
    policy = to_str(value, name)
    if policy not in ("deny", "allow"):
        raise GenericError(f"Parameter '{name}' does not accept value '{policy}'")
    return policy


def parse_rules(value: Any) -> list[Rule]:
    """The ``rules`` list, with QEMU's visitor texts."""
    if not isinstance(value, list):
        raise GenericError("Invalid parameter type for 'rules', expected: array")
    rules = []
    for i, item in enumerate(value):
        where = f"rules[{i}]"
        if not isinstance(item, dict):
            raise GenericError(f"Invalid parameter type for '{where}', expected: object")
        if "match" not in item:
            raise GenericError(f"Parameter '{where}.match' is missing")
        match = to_str(item["match"], f"{where}.match")
        if "policy" not in item:
            raise GenericError(f"Parameter '{where}.policy' is missing")
        policy = _policy(item["policy"], "policy")
        fmt = to_str(item.get("format", "exact"), "format")
        if fmt not in ("exact", "glob"):
            raise GenericError(f"Parameter 'format' does not accept value '{fmt}'")
        check_members(item, ("match", "policy", "format"), f"{where}.")
        rules.append(Rule(match, policy, fmt == "glob"))
    return rules


class AuthzList(Authz):
    """Rules tried in order, the first match decides; else ``policy`` (deny)."""

    qom_type = "authz-list"
    properties = ("policy", "rules")
    qom_properties = (("policy", "QAuthZListPolicy"), ("rules", "QAuthZListRule"))

    def __init__(self, object_id: str, policy: str, rules: list[Rule]) -> None:
        super().__init__(object_id)
        self.policy = policy
        self.rules = rules

    @classmethod
    def create(cls, object_id: str, props: dict[str, Any],
               secret: SecretLookup | None = None) -> AuthzList:
        policy = _policy(props.get("policy", "deny"), "policy")
        rules = parse_rules(props["rules"]) if "rules" in props else []
        check_members(props, cls.properties)
        return cls(object_id, policy, rules)

    def is_allowed(self, identity: str) -> bool:
        for rule in self.rules:
            if rule.matches(identity):
                return rule.policy == "allow"
        return self.policy == "allow"

    def qom_get(self, name: str) -> Any:
        if name == "policy":
            return self.policy
        if name == "rules":
            return [rule.to_qapi() for rule in self.rules]
        return super().qom_get(name)


class AuthzListFile(Authz):
    """An ``authz-list`` read from a JSON file (QEMU's format)."""

    qom_type = "authz-list-file"
    properties = ("filename", "refresh")
    qom_properties = (("filename", "string"), ("refresh", "bool"))

    def __init__(self, object_id: str, filename: str, policy: AuthzList) -> None:
        super().__init__(object_id)
        self.filename = filename
        self.list = policy

    @classmethod
    def create(cls, object_id: str, props: dict[str, Any],
               secret: SecretLookup | None = None) -> AuthzListFile:
        if "filename" not in props:
            raise GenericError("Parameter 'filename' is missing")
        filename = to_str(props["filename"], "filename")
        refresh = props.get("refresh", False)
        if isinstance(refresh, str) and refresh in ("on", "off", "true", "false", "yes", "no"):
            refresh = refresh in ("on", "true", "yes")  # the command line's keyval form
        if not isinstance(refresh, bool):
            raise GenericError("Invalid parameter type for 'refresh', expected: boolean")
        check_members(props, cls.properties)
        if refresh:
            raise GenericError("qmpd does not watch files: authz-list-file needs refresh=off")
        return cls(object_id, filename, cls._load(object_id, filename))

    @staticmethod
    def _load(object_id: str, filename: str) -> AuthzList:
        text = read_secret_file(filename)
        if not text.strip():
            return AuthzList(object_id, "deny", [])
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GenericError(f"JSON parse error, {exc.msg}") from None
        except ValueError:
            raise GenericError("JSON parse error, invalid UTF-8 sequence") from None
        if not isinstance(data, dict):
            raise GenericError("File must contain a JSON object")
        return AuthzList.create(object_id, data)

    def is_allowed(self, identity: str) -> bool:
        return self.list.is_allowed(identity)

    def qom_get(self, name: str) -> Any:
        if name == "filename":
            return self.filename
        if name == "refresh":
            return False
        return super().qom_get(name)


def check_peer(authz: Authz, cert: dict[str, Any] | None) -> str | None:
    """Why a TLS peer is refused (QEMU's text), or None: its certificate's DN must be allowed."""
    if cert is None:
        return "TLS x509 authz check: the client presented no verified certificate"
    dn = format_dn(cert.get("subject", ()))
    if authz.is_allowed(dn):
        return None
    return f"TLS x509 authz check for {dn} is denied"
