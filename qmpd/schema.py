"""The QMP schema: loading, argument validation in QAPI's words, introspection.

The JSON Schema documents under ``schema/`` (shipped in the wheel as
``qmpd/_schema``) are the single source for what commands and events exist,
what their arguments and results look like, ``query-commands`` and
``query-qmp-schema``.  Layout:

* ``types.json`` (and ``types-<module>.json``): named types under ``$defs``
  (QAPI names; a name is defined in exactly one file);
* ``commands/<name>.json``: ``command``, ``arguments`` (an object schema),
  optional ``returns``, optional ``allow-oob``;
* ``events/<NAME>.json``: ``event`` and optional ``data``.

Integers carry ``x-qapi-type`` (``int``, ``int8`` … ``uint64``, ``size``)
so that range errors read as QEMU's; alternates carry ``x-qapi-alternate``
with their QAPI type name and list their branches under ``anyOf``.

Validation first runs a check compiled from the schema
(:mod:`qmpd.schema_check`, built per command on first use), which only
says valid or not.  Input it rejects goes to jsonschema (imported then, not
at start-up) for the errors: QEMU reports only the first error its visitor
meets (schema member order, depth first, unexpected members after the known
ones), so every jsonschema error is given a position in that order and the
earliest one is translated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmpd.errors import ArgumentError
from qmpd.ghash import first_unexpected
from qmpd.qmp.encode import qdict_order
from qmpd.schema_check import Check, Compiler

if TYPE_CHECKING:
    from jsonschema.exceptions import ValidationError

_BASE_URI = "file:///qmpd-schema/"
_DEFS_PREFIX = "#/$defs/"

_INT_RANGES = {
    "int8": (-(1 << 7), (1 << 7) - 1),
    "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "int": (-(1 << 63), (1 << 63) - 1),
    "uint8": (0, (1 << 8) - 1),
    "uint16": (0, (1 << 16) - 1),
    "uint32": (0, (1 << 32) - 1),
    "uint64": (-(1 << 63), (1 << 64) - 1),
    "size": (-(1 << 63), (1 << 64) - 1),
}
_C_TYPE_NAMES = {
    "int8": "int8_t",
    "int16": "int16_t",
    "int32": "int32_t",
    "uint8": "uint8_t",
    "uint16": "uint16_t",
    "uint32": "uint32_t",
}
_JSON_TYPE_NAMES = {
    "object": "object",
    "array": "array",
    "integer": "integer",
    "boolean": "boolean",
    "string": "string",
    "number": "number",
    "null": "null",
}


def _is_int(_checker: object, instance: object) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


def _is_number(_checker: object, instance: object) -> bool:
    return isinstance(instance, (int, float)) and not isinstance(instance, bool)


_QMP_VALIDATOR: Any = None


def qmp_validator_class() -> Any:
    """jsonschema's 2020-12 validator with QAPI's integers (imported on first use)."""
    global _QMP_VALIDATOR
    if _QMP_VALIDATOR is None:
        import jsonschema
        from jsonschema import Draft202012Validator

        # QAPI never takes 2.0 for an integer, unlike JSON Schema.
        checker = Draft202012Validator.TYPE_CHECKER.redefine_many(
            {"integer": _is_int, "number": _is_number}
        )
        _QMP_VALIDATOR = jsonschema.validators.extend(
            Draft202012Validator, type_checker=checker
        )
    return _QMP_VALIDATOR


def schema_dir() -> str:
    """Where the schema files are: inside the installed package, or the checkout."""
    # os.path, not importlib.resources or pathlib: they cost a tenth of the
    # time to listening (issue 10), and qmpd is never run from a zip.
    here = os.path.dirname(os.path.realpath(__file__))
    packaged = os.path.join(here, "_schema")
    if os.path.isdir(packaged):
        return packaged
    return os.path.join(os.path.dirname(here), "schema")


def _json_files(directory: str, prefix: str = "") -> list[str]:
    """The ``prefix*.json`` files in ``directory``, sorted (as glob would find them)."""
    return sorted(
        os.path.join(directory, name) for name in os.listdir(directory)
        if name.endswith(".json") and name.startswith(prefix) and not name.startswith(".")
    )


def _load(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass
class CommandSchema:
    """One command: its argument and result schemas."""

    name: str
    arguments: dict[str, Any]
    returns: dict[str, Any] | None
    allow_oob: bool
    module: str
    takes_arguments: bool = True


@dataclass
class EventSchema:
    """One event and its data schema (None when it has no data)."""

    name: str
    data: dict[str, Any] | None
    module: str


class Schema:
    """All commands, events and types; checks compiled and validators built on first use."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = root = os.fspath(root) if root else schema_dir()
        self.types: dict[str, dict[str, Any]] = {}
        self._type_docs: dict[str, dict[str, Any]] = {}
        for path in _json_files(root, "types"):
            types_doc = _load(path)
            filename = os.path.basename(path)
            for name, definition in types_doc["$defs"].items():
                if name in self.types:
                    raise ValueError(f"type {name} defined twice (again in {filename})")
                self.types[name] = definition
            self._type_docs[filename] = types_doc
        self.commands: dict[str, CommandSchema] = {}
        self.events: dict[str, EventSchema] = {}
        for path in _json_files(os.path.join(root, "commands")):
            doc = _load(path)
            name = doc["command"]
            args = doc.get("arguments") or {"type": "object", "additionalProperties": False}
            self.commands[name] = CommandSchema(
                name=name,
                arguments=args,
                returns=doc.get("returns"),
                allow_oob=bool(doc.get("allow-oob", False)),
                module=doc.get("module", ""),
                takes_arguments=self._takes_arguments(args),
            )
        for path in _json_files(os.path.join(root, "events")):
            doc = _load(path)
            name = doc["event"]
            self.events[name] = EventSchema(
                name=name, data=doc.get("data"), module=doc.get("module", "")
            )
        self._compiler = Compiler(
            {file: doc["$defs"] for file, doc in self._type_docs.items()}
        )
        #: Compiled checks and jsonschema validators by (kind, name), built on first use.
        self._checks: dict[tuple[str, str], Check] = {}
        self._validators: dict[tuple[str, str], Any] = {}
        self._registry: Any = None
        self._introspection: list[dict[str, Any]] | None = None

    def _schema_of(self, kind: str, name: str) -> tuple[str, dict[str, Any]]:
        if kind == "event":
            data = self.events[name].data
            assert data is not None
            return f"events/{name}.json", data
        cmd = self.commands[name]
        schema = cmd.arguments if kind == "arguments" else cmd.returns
        assert schema is not None
        return f"commands/{name}.json", schema

    def check(self, kind: str, name: str) -> Check:
        """The compiled accept/reject check of a command's ``arguments`` or
        ``returns``, or of an ``event``'s data."""
        check = self._checks.get((kind, name))
        if check is None:
            relpath, schema = self._schema_of(kind, name)
            check = self._checks[(kind, name)] = self._compiler.compile(schema, relpath).check
        return check

    def compiled(self, kind: str, name: str) -> bool:
        """Whether :meth:`check` has compiled that check already."""
        return (kind, name) in self._checks

    def validator(self, kind: str, name: str) -> Any:
        """jsonschema's validator for the same schema (imports jsonschema)."""
        validator = self._validators.get((kind, name))
        if validator is None:
            relpath, schema = self._schema_of(kind, name)
            validator = self._validators[(kind, name)] = self._validator(relpath, schema)
        return validator

    def _takes_arguments(self, args: dict[str, Any]) -> bool:
        resolved = self.resolve(args)
        return bool(resolved.get("properties") or resolved.get("required"))

    def properties(self, schema: dict[str, Any], value: Any) -> dict[str, Any]:
        """The members QEMU visits for ``value``, in order (unions: base, then variant)."""
        props: dict[str, Any] = schema.get("properties", {})
        union = schema.get("x-qapi-union")
        if union is not None and isinstance(value, dict):
            variant = union["variants"].get(value.get(union["discriminator"]))
            if variant is not None:
                props = {**props, **self.resolve({"$ref": variant}).get("properties", {})}
        return props

    def _validator(self, relpath: str, schema: dict[str, Any]) -> Any:
        if self._registry is None:
            import referencing
            import referencing.jsonschema

            self._registry = referencing.Registry().with_resources(
                (_BASE_URI + file, referencing.jsonschema.DRAFT202012.create_resource(doc))
                for file, doc in self._type_docs.items()
            )
        cls = qmp_validator_class()
        wrapped = dict(schema)
        wrapped["$id"] = _BASE_URI + relpath
        cls.check_schema(wrapped)
        return cls(wrapped, registry=self._registry)

    # --- references --------------------------------------------------------

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        """Follow ``$ref`` to a named type (refs point into the types files)."""
        while "$ref" in schema:
            ref = schema["$ref"]
            name = ref.split(_DEFS_PREFIX, 1)[1]
            schema = self.types[name]
        return schema

    @staticmethod
    def ref_name(schema: dict[str, Any]) -> str | None:
        ref = schema.get("$ref")
        if ref is None:
            return None
        return str(ref).split(_DEFS_PREFIX, 1)[1]

    # --- validation --------------------------------------------------------

    def validate_arguments(self, command: str, arguments: dict[str, Any]) -> None:
        """Raise ArgumentError with QEMU's text for the first problem found."""
        cmd = self.commands[command]
        if not arguments and not cmd.takes_arguments:
            return
        if self.check("arguments", command)(arguments):
            return
        errors = list(self.validator("arguments", command).iter_errors(arguments))
        if errors:
            raise ArgumentError(self._first_error(cmd.arguments, arguments, errors))

    def validate_returns(self, command: str, value: Any) -> list[str]:
        """Problems with a command's return value (empty when it conforms)."""
        cmd = self.commands[command]
        if cmd.returns is None:
            return [] if value == {} else [f"{command} returns no data, got {value!r}"]
        if self.check("returns", command)(value):
            return []
        return [e.message for e in self.validator("returns", command).iter_errors(value)]

    def validate_event(self, event: str, data: Any) -> list[str]:
        """Problems with an event's data (empty when it conforms)."""
        ev = self.events.get(event)
        if ev is None:
            return [f"unknown event {event}"]
        if ev.data is None:
            return [] if data is None else [f"{event} has no data, got {data!r}"]
        if self.check("event", event)(data):
            return []
        return [e.message for e in self.validator("event", event).iter_errors(data)]

    def _first_error(
        self, schema: dict[str, Any], instance: Any, errors: list[ValidationError]
    ) -> str:
        candidates: list[tuple[tuple[int, ...], str]] = []
        for error in errors:
            candidates.extend(self._translate(schema, instance, error, ()))
        candidates.sort(key=lambda c: c[0])
        return candidates[0][1] if candidates else "Invalid arguments"

    def _translate(
        self, root: dict[str, Any], instance: Any, error: ValidationError, base: tuple[Any, ...]
    ) -> Iterator[tuple[tuple[int, ...], str]]:
        path = base + tuple(error.path)
        order, schema = self._position(root, instance, path)
        value = error.instance
        kind = error.validator
        if kind not in ("anyOf", "oneOf"):
            schema = self._select_branch(schema, value)
        full = _full_name(path)
        bare = _bare_name(path)
        qapi_int = schema.get("x-qapi-type")
        if kind == "required":
            names = list(self.properties(schema, value))
            for name in error.validator_value:
                if isinstance(value, dict) and name not in value:
                    index = names.index(name) if name in names else len(names)
                    yield (*order, index, 0), f"Parameter '{_full_name((*path, name))}' is missing"
        elif kind in ("additionalProperties", "unevaluatedProperties"):
            members = self.properties(schema, value)
            if isinstance(value, dict) and any(name not in members for name in value):
                # QEMU names the leftover key its GLib hash table yields first.
                visited = [name for name in members if name in value]
                name = first_unexpected(qdict_order(list(value)), visited)
                if name is not None:
                    msg = f"Parameter '{_full_name((*path, name))}' is unexpected"
                    yield (*order, len(members), 0), msg
        elif kind in ("anyOf", "oneOf") and "x-qapi-alternate" in schema:
            branch = _alternate_branch(self, schema, value)
            if branch is None:
                msg = f"Invalid parameter type for '{bare}', expected: {schema['x-qapi-alternate']}"
                yield (*order, -1), msg
            else:
                for sub in error.context or ():
                    if sub.relative_schema_path and sub.relative_schema_path[0] == branch:
                        yield from self._translate(root, instance, sub, path)
        elif qapi_int in ("uint64", "size") or (
            qapi_int in _C_TYPE_NAMES and qapi_int.startswith("u")
        ):
            lo, hi = _INT_RANGES["uint64"]
            if not _is_int(None, value) or not lo <= value <= hi:
                yield (*order, -1), f"Parameter '{full}' expects uint64"
            else:
                yield (*order, -1), f"Parameter '{bare}' expects {_C_TYPE_NAMES[qapi_int]}"
        elif qapi_int in _C_TYPE_NAMES:
            lo, hi = _INT_RANGES["int"]
            if not _is_int(None, value) or not lo <= value <= hi:
                yield (*order, -1), f"Invalid parameter type for '{full}', expected: integer"
            else:
                yield (*order, -1), f"Parameter '{bare}' expects {_C_TYPE_NAMES[qapi_int]}"
        elif kind == "type" or qapi_int == "int":
            expected = schema.get("type", "object")
            if isinstance(expected, list):
                expected = expected[0]
            yield (*order, -1), (
                f"Invalid parameter type for '{full}', "
                f"expected: {_JSON_TYPE_NAMES.get(expected, expected)}"
            )
        elif kind == "enum":
            if isinstance(value, str):
                yield (*order, 0), f"Parameter '{bare}' does not accept value '{value}'"
        else:
            yield (*order, 1), f"Parameter '{full}' is invalid: {error.message}"

    def _position(
        self, root: dict[str, Any], instance: Any, path: tuple[Any, ...]
    ) -> tuple[tuple[int, ...], dict[str, Any]]:
        """Where ``path`` falls in QEMU's visiting order, and its schema.

        Alternates are followed into the branch the instance selects, as
        QEMU's visitor does.
        """
        schema = self._select_branch(self.resolve(root), instance)
        value = instance
        order: list[int] = []
        for step in path:
            if isinstance(step, int):
                order.append(step)
                schema = self.resolve(schema.get("items", {}))
            else:
                props = self.properties(schema, value)
                if step in props:
                    order.append(list(props).index(step))
                    schema = self.resolve(props[step])
                else:
                    order.append(len(props))
                    schema = {}
            try:
                value = value[step]
            except (KeyError, IndexError, TypeError):
                value = None
            schema = self._select_branch(schema, value, last=step == path[-1])
        return tuple(order), schema

    def _select_branch(
        self, schema: dict[str, Any], value: Any, last: bool = False
    ) -> dict[str, Any]:
        if "x-qapi-alternate" not in schema or last:
            return schema
        branch = _alternate_branch(self, schema, value)
        if branch is None:
            return schema
        return self.resolve(schema.get("anyOf", schema.get("oneOf", []))[branch])

    # --- introspection -----------------------------------------------------

    def introspect(self) -> list[dict[str, Any]]:
        """query-qmp-schema's SchemaInfo list for exactly what qmpd implements."""
        if self._introspection is None:
            self._introspection = _Introspector(self).run()
        return self._introspection


def _alternate_branch(schema_: Schema, alternate: dict[str, Any], value: Any) -> int | None:
    """The branch QEMU's alternate visitor picks by JSON type, if any."""
    json_type = _json_type(value)
    for index, branch in enumerate(alternate.get("anyOf", alternate.get("oneOf", []))):
        resolved = schema_.resolve(branch)
        expected = resolved.get("type")
        if expected == json_type or (expected == "number" and json_type == "integer"):
            return index
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _full_name(path: tuple[Any, ...]) -> str:
    out = ""
    for step in path:
        if isinstance(step, int):
            out += f"[{step}]"
        elif out:
            out += "." + step
        else:
            out = step
    return out


def _bare_name(path: tuple[Any, ...]) -> str:
    if path and isinstance(path[-1], str):
        return path[-1]
    return "null"


_BUILTIN_JSON_TYPES = {
    "str": "string",
    "int": "int",
    "number": "number",
    "bool": "boolean",
    "null": "null",
    "any": "value",
}
_BUILTIN_FOR_TYPE = {
    "string": "str",
    "integer": "int",
    "number": "number",
    "boolean": "bool",
    "null": "null",
}


class _Introspector:
    """Builds SchemaInfo entries; non-command, non-event names are masked."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.entries: list[dict[str, Any]] = []
        self.names: dict[str, str] = {}  # identity key -> public name
        self.counter = 0

    def run(self) -> list[dict[str, Any]]:
        for name, cmd in self.schema.commands.items():
            entry: dict[str, Any] = {
                "name": name,
                "meta-type": "command",
                "arg-type": self.type_name(cmd.arguments, f"q_obj_{name}-arg"),
                "ret-type": self.type_name(cmd.returns, None)
                if cmd.returns is not None
                else self.type_name({"type": "object", "properties": {}}, "q_empty"),
            }
            if cmd.allow_oob:
                entry["allow-oob"] = True
            self.entries.append(entry)
        for name, ev in self.schema.events.items():
            arg = (
                self.type_name(ev.data, f"q_obj_{name}-arg")
                if ev.data is not None
                else self.type_name({"type": "object", "properties": {}}, "q_empty")
            )
            self.entries.append({"name": name, "meta-type": "event", "arg-type": arg})
        return self.entries

    def _mask(self) -> str:
        name = str(self.counter)
        self.counter += 1
        return name

    def type_name(self, schema: dict[str, Any], anon_key: str | None) -> str:
        ref = Schema.ref_name(schema)
        if ref is not None:
            key = "def:" + ref
            if key in self.names:
                return self.names[key]
            resolved = self.schema.types[ref]
            return self._define(key, resolved)
        if not schema:
            return self._builtin("any")
        json_type = schema.get("type")
        if json_type == "array":
            element = self.type_name(schema.get("items", {}), None)
            name = f"[{element}]"
            if "arr:" + name not in self.names:
                self.names["arr:" + name] = name
                self.entries.append({"name": name, "meta-type": "array", "element-type": element})
            return name
        if json_type in _BUILTIN_FOR_TYPE and "enum" not in schema:
            return self._builtin(_BUILTIN_FOR_TYPE[json_type])
        key = "anon:" + (anon_key or json.dumps(schema, sort_keys=True))
        if key in self.names:
            return self.names[key]
        return self._define(key, schema)

    def _builtin(self, name: str) -> str:
        key = "builtin:" + name
        if key not in self.names:
            self.names[key] = name
            self.entries.append(
                {"name": name, "meta-type": "builtin", "json-type": _BUILTIN_JSON_TYPES[name]}
            )
        return name

    def _define(self, key: str, schema: dict[str, Any]) -> str:
        name = self._mask()
        self.names[key] = name
        if "enum" in schema:
            values = list(schema["enum"])
            self.entries.append(
                {
                    "name": name,
                    "meta-type": "enum",
                    "members": [{"name": v} for v in values],
                    "values": values,
                }
            )
            return name
        if "x-qapi-alternate" in schema:
            entry: dict[str, Any] = {"name": name, "meta-type": "alternate", "members": []}
            self.entries.append(entry)
            for branch in schema.get("anyOf", schema.get("oneOf", [])):
                entry["members"].append({"type": self.type_name(branch, None)})
            return name
        entry = {"name": name, "meta-type": "object", "members": []}
        self.entries.append(entry)
        required = set(schema.get("required", []))
        for member, sub in schema.get("properties", {}).items():
            info: dict[str, Any] = {"name": member, "type": self.type_name(sub, None)}
            if member not in required:
                info["default"] = None
            entry["members"].append(info)
        union = schema.get("x-qapi-union")
        if union is not None:
            entry["tag"] = union["discriminator"]
            entry["variants"] = [
                {"case": case, "type": self.type_name({"$ref": ref}, None)}
                for case, ref in union["variants"].items()
            ]
        return name
