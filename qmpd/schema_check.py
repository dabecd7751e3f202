"""A compiled accept/reject check for the JSON Schema subset used in ``schema/``.

Each schema is turned once into plain closures that answer "valid or not"
with JSON Schema 2020-12's meaning (and QAPI's integers: a bool is not an
integer, 2.0 is not one either), agreeing with what jsonschema says.  The
check only decides; the texts of errors still come from the jsonschema path
in :mod:`qmpd.schema`, run only for input the check rejects.

Only the keywords listed in ``_KNOWN`` are understood; any other keyword in a
schema makes compilation fail (:class:`SchemaCompileError`), so a schema
change cannot quietly be checked less strictly than jsonschema would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Check = Callable[[Any], bool]
Keys = Callable[[Any], set[str]]

#: Keywords that only annotate (QAPI's names, documentation).
_ANNOTATIONS = frozenset(
    {"description", "title", "$comment", "$schema", "$id", "x-qapi-type", "x-qapi-alternate",
     "x-qapi-union"}
)
#: Keywords this compiler checks.
_KNOWN = frozenset(
    {"type", "properties", "required", "additionalProperties", "unevaluatedProperties",
     "allOf", "anyOf", "not", "if", "then", "else", "const", "enum", "$ref", "items",
     "minimum", "maximum"}
) | _ANNOTATIONS

_DEFS = "#/$defs/"


class SchemaCompileError(ValueError):
    """A schema uses something the compiler does not know."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_TYPE_TESTS: dict[str, Check] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": _is_int,
    "number": _is_number,
}


def _always(_v: Any) -> bool:
    return True


def _never(_v: Any) -> bool:
    return False


def _no_keys(_v: Any) -> set[str]:
    return set()


class Node:
    """One compiled schema: ``check`` decides; ``keys`` names the object members a
    valid instance has evaluated (for ``unevaluatedProperties`` above it)."""

    __slots__ = ("check", "keys")

    def __init__(self, check: Check, keys: Keys) -> None:
        self.check = check
        self.keys = keys


class Compiler:
    """Compiles schemas whose ``$ref`` point into named type files.

    ``defs`` maps a file name (``types.json``...) to its ``$defs``; named types
    are compiled once and shared.
    """

    def __init__(self, defs: Mapping[str, Mapping[str, Any]]) -> None:
        self.defs = defs
        self._named: dict[tuple[str, str], Node] = {}

    def compile(self, schema: Any, base: str = "") -> Node:
        """The check of ``schema``, whose relative ``$ref`` are resolved against ``base``
        (a path such as ``commands/x.json`` or ``types.json``)."""
        if schema is True:
            return Node(_always, _no_keys)
        if schema is False:
            return Node(_never, _no_keys)
        if not isinstance(schema, dict):
            raise SchemaCompileError(f"not a schema: {schema!r}")
        unknown = set(schema) - _KNOWN
        if unknown:
            raise SchemaCompileError(f"unknown keyword(s) {sorted(unknown)} in {base}")
        checks: list[Check] = []
        key_sources: list[Keys] = []

        if "$ref" in schema:
            target = self._ref(schema["$ref"], base)
            checks.append(lambda v: target.check(v))
            key_sources.append(lambda v: target.keys(v))
        if "type" in schema:
            checks.append(_type_check(schema["type"]))
        if "const" in schema:
            checks.append(_enum_check([schema["const"]]))
        if "enum" in schema:
            checks.append(_enum_check(schema["enum"]))
        if "minimum" in schema or "maximum" in schema:
            checks.append(_range_check(schema.get("minimum"), schema.get("maximum")))
        if "items" in schema:
            item = self.compile(schema["items"], base).check

            def items(v: Any) -> bool:
                if not isinstance(v, list):
                    return True
                for element in v:
                    if not item(element):
                        return False
                return True

            checks.append(items)
        if "properties" in schema or "required" in schema or "additionalProperties" in schema:
            check, keys = self._object(schema, base)
            checks.append(check)
            key_sources.append(keys)
        if "allOf" in schema:
            check, keys = self._all_of(schema["allOf"], base)
            checks.append(check)
            key_sources.append(keys)
        if "anyOf" in schema:
            branches = [self.compile(s, base) for s in _list(schema["anyOf"], "anyOf")]
            checks.append(lambda v: any(b.check(v) for b in branches))
            key_sources.append(lambda v: _union(b.keys(v) for b in branches if b.check(v)))
        if "not" in schema:
            negated = self.compile(schema["not"], base).check
            checks.append(lambda v: not negated(v))
        if "if" in schema:
            check, keys = self._if(schema, base)
            checks.append(check)
            key_sources.append(keys)
        if "unevaluatedProperties" in schema:
            # Runs after everything else: it needs what they evaluated.
            sources = list(key_sources)
            rest = self.compile(schema["unevaluatedProperties"], base).check

            def unevaluated(v: Any) -> bool:
                if not isinstance(v, dict):
                    return True
                seen: set[str] = set()
                for source in sources:
                    seen |= source(v)
                return all(rest(value) for key, value in v.items() if key not in seen)

            checks.append(unevaluated)
            key_sources = [lambda v: set(v) if isinstance(v, dict) else set()]
        return Node(_all(checks), _keys_of(key_sources))

    # --- pieces ----------------------------------------------------------------

    def _ref(self, ref: Any, base: str) -> Node:
        if not isinstance(ref, str) or _DEFS not in ref:
            raise SchemaCompileError(f"unsupported $ref {ref!r} in {base}")
        path, name = ref.split(_DEFS, 1)
        file = path.rsplit("/", 1)[-1] if path else base.rsplit("/", 1)[-1]
        defs = self.defs.get(file)
        if defs is None or name not in defs:
            raise SchemaCompileError(f"$ref {ref!r} in {base} names no type")
        key = (file, name)
        node = self._named.get(key)
        if node is None:
            # Placeholder first: named types may refer to themselves.
            node = self._named[key] = Node(_always, _no_keys)
            compiled = self.compile(defs[name], file)
            node.check, node.keys = compiled.check, compiled.keys
        return node

    def _object(self, schema: dict[str, Any], base: str) -> tuple[Check, Keys]:
        props = {
            name: self.compile(sub, base).check
            for name, sub in _dict(schema.get("properties", {}), "properties").items()
        }
        required = tuple(_list(schema.get("required", []), "required"))
        extra = schema.get("additionalProperties", True)
        extra_check = None if extra is True else self.compile(extra, base).check
        closed = extra is False
        get = props.get

        def check(v: Any) -> bool:
            if not isinstance(v, dict):
                return True
            for name in required:
                if name not in v:
                    return False
            for key, value in v.items():
                member = get(key)
                if member is None:
                    if closed:
                        return False
                    if extra_check is not None and not extra_check(value):
                        return False
                elif not member(value):
                    return False
            return True

        if "additionalProperties" in schema:
            return check, lambda v: set(v) if isinstance(v, dict) else set()
        names = set(props)
        return check, lambda v: names.intersection(v) if isinstance(v, dict) else set()

    def _all_of(self, subs: Any, base: str) -> tuple[Check, Keys]:
        subs = _list(subs, "allOf")
        dispatch = self._discriminated(subs, base)
        if dispatch is not None:
            return dispatch
        nodes = [self.compile(s, base) for s in subs]
        checks = [n.check for n in nodes]
        return _all(checks), _keys_of([n.keys for n in nodes])

    def _discriminated(self, subs: list[Any], base: str) -> tuple[Check, Keys] | None:
        """allOf of ``if {properties: {D: {const: c}}, required: [D]} then X`` with one
        D and distinct string c (a QAPI flat union): one lookup instead of a scan."""
        tag: str | None = None
        table: dict[str, Node] = {}
        for sub in subs:
            if not isinstance(sub, dict) or set(sub) != {"if", "then"}:
                return None
            cond = sub["if"]
            if not isinstance(cond, dict) or set(cond) != {"properties", "required"}:
                return None
            props = cond["properties"]
            if not isinstance(props, dict) or len(props) != 1:
                return None
            ((name, test),) = props.items()
            if cond["required"] != [name] or not isinstance(test, dict) or set(test) != {"const"}:
                return None
            value = test["const"]
            if not isinstance(value, str) or (tag is not None and name != tag) or value in table:
                return None
            tag = name
            table[value] = self.compile(sub["then"], base)
        if tag is None:
            return None
        nodes = list(table.values())
        tag_key = tag

        def check(v: Any) -> bool:
            if not isinstance(v, dict):
                return all(n.check(v) for n in nodes)  # every "if" holds for a non-object
            value = v.get(tag_key)
            if not isinstance(value, str):
                return True
            node = table.get(value)
            return node is None or node.check(v)

        def keys(v: Any) -> set[str]:
            if not isinstance(v, dict):
                return set()
            value = v.get(tag_key)
            node = table.get(value) if isinstance(value, str) else None
            if node is None:
                return set()
            return {tag_key} | node.keys(v)

        return check, keys

    def _if(self, schema: dict[str, Any], base: str) -> tuple[Check, Keys]:
        cond = self.compile(schema["if"], base)
        then = self.compile(schema["then"], base) if "then" in schema else None
        other = self.compile(schema["else"], base) if "else" in schema else None

        def check(v: Any) -> bool:
            if cond.check(v):
                return then is None or then.check(v)
            return other is None or other.check(v)

        def keys(v: Any) -> set[str]:
            if cond.check(v):
                found = cond.keys(v)
                return found | then.keys(v) if then is not None else found
            return other.keys(v) if other is not None else set()

        return check, keys


def _type_check(types: Any) -> Check:
    names = [types] if isinstance(types, str) else _list(types, "type")
    tests = []
    for name in names:
        if name not in _TYPE_TESTS:
            raise SchemaCompileError(f"unknown type {name!r}")
        tests.append(_TYPE_TESTS[name])
    if len(tests) == 1:
        return tests[0]
    return lambda v: any(t(v) for t in tests)


def _enum_check(values: Any) -> Check:
    values = _list(values, "enum")
    if not all(isinstance(x, str) for x in values):
        raise SchemaCompileError(f"enum/const of non-strings {values!r}")
    allowed = frozenset(values)
    return lambda v: isinstance(v, str) and v in allowed


def _range_check(lo: Any, hi: Any) -> Check:
    for bound in (lo, hi):
        if bound is not None and not _is_number(bound):
            raise SchemaCompileError(f"bad bound {bound!r}")
    low = lo if lo is not None else float("-inf")
    high = hi if hi is not None else float("inf")
    return lambda v: not _is_number(v) or low <= v <= high


def _all(checks: list[Check]) -> Check:
    if not checks:
        return _always
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks
        return lambda v: first(v) and second(v)
    frozen = tuple(checks)

    def every(v: Any) -> bool:
        for check in frozen:
            if not check(v):
                return False
        return True

    return every


def _keys_of(sources: list[Keys]) -> Keys:
    if not sources:
        return _no_keys
    if len(sources) == 1:
        return sources[0]
    frozen = tuple(sources)
    return lambda v: _union(source(v) for source in frozen)


def _union(sets: Any) -> set[str]:
    out: set[str] = set()
    for found in sets:
        out |= found
    return out


def _list(value: Any, keyword: str) -> list[Any]:
    if not isinstance(value, list):
        raise SchemaCompileError(f"{keyword} must be a list, not {value!r}")
    return value


def _dict(value: Any, keyword: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SchemaCompileError(f"{keyword} must be an object, not {value!r}")
    return value
