"""The ``secret`` object: bytes given inline or read from a file.

The value is never shown: not in replies, logs or reprs.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any

from qmpd.errors import GenericError
from qmpd.objects.base import SecretLookup, UserObject, check_members, to_str

_BASE64_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n"
)


def decode_base64(text: str) -> bytes:
    """As QEMU's qbase64_decode: its alphabet and newlines, padding optional."""
    if "\0" in text:
        raise GenericError("Base64 data contains embedded NUL characters")
    if not set(text) <= _BASE64_CHARS:
        raise GenericError("Base64 data contains invalid characters")
    compact = text.replace("\n", "").rstrip("=")
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4))
    except binascii.Error:
        raise GenericError("Base64 data is not valid") from None


def read_secret_file(path: str) -> bytes:
    """The file's bytes, with GLib's texts (g_file_get_contents) on failure."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise GenericError(
            f"Unable to read {path}: Failed to open file \u201c{path}\u201d: {exc.strerror}"
        ) from None
    try:
        chunks: list[bytes] = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    except OSError as exc:
        raise GenericError(
            f"Unable to read {path}: Error reading file \u201c{path}\u201d: {exc.strerror}"
        ) from None
    finally:
        os.close(fd)


class Secret(UserObject):
    """Options: ``data`` or ``file``, ``format`` raw (default) or base64."""

    qom_type = "secret"
    qom_parent = "secret_common"
    properties = ("format", "data", "file")
    qom_properties = (("iv", "string"), ("keyid", "string"), ("loaded", "bool"),
                      ("format", "QCryptoSecretFormat"), ("file", "string"),
                      ("data", "string"))

    def __init__(self, object_id: str, value: bytes, fmt: str = "raw",
                 path: str | None = None) -> None:
        super().__init__(object_id)
        self._value = value
        self.format = fmt
        self.file = path

    def __repr__(self) -> str:
        return f"Secret(id={self.id!r})"

    @property
    def value(self) -> bytes:
        return self._value

    @classmethod
    def create(cls, object_id: str, props: dict[str, Any],
               secret: SecretLookup | None = None) -> Secret:
        fmt = to_str(props.get("format", "raw"), "format")
        if fmt not in ("raw", "base64"):
            raise GenericError(f"Parameter 'format' does not accept value '{fmt}'")
        data = props.get("data")
        path = props.get("file")
        check_members(props, cls.properties)
        if data is not None and path is not None:
            raise GenericError("'file' and 'data' are mutually exclusive")
        if data is not None:
            raw = to_str(data, "data").encode()
        elif path is not None:
            raw = read_secret_file(to_str(path, "file"))
        else:
            raise GenericError("Either 'file' or 'data' must be provided")
        if fmt == "base64":
            raw = decode_base64(raw.decode("utf-8", "replace"))
        return cls(object_id, raw, fmt, path)

    def qom_get(self, name: str) -> Any:
        if name == "data":
            # QEMU returns the secret here; qmpd never shows it.
            raise GenericError("qmpd never shows a secret's data")
        values = {"iv": "", "keyid": "", "loaded": True, "format": self.format,
                  "file": self.file or ""}
        if name in values:
            return values[name]
        return super().qom_get(name)
